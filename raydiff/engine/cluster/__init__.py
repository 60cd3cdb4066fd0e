"""Cluster-facing checks: placement of roles, node shapes the cluster offers, run feasibility, the memory plan."""
