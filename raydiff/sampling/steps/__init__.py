"""Step maths by kind: one file per sampler (`ddim` for ε-prediction UNets, `flow_sde` for rectified flow)."""
