"""Moved to `raydiff.sampling.policy` (the model-facing half of the learner); this name stays for older imports."""

from raydiff.sampling.policy import Policy  # noqa: F401
