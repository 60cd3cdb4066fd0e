"""Rollout side: the worker actor that samples and scores, the restartable group the driver drives."""
