"""Cluster-facing checks: the memory plan (plan.py) and its meta-device building blocks."""
