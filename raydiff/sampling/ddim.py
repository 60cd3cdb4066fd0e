"""Moved to `raydiff.sampling.steps.ddim`; this name stays so older imports keep working."""

from raydiff.sampling.steps.ddim import (  # noqa: F401
    StepOutput, alphas_at, backward_log_prob, ddim_step, gaussian_log_density, gaussian_log_prob,
)
