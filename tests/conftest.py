"""Shared pytest fixtures: one Ray cluster per session and the reward service on it."""

from __future__ import annotations

import os

import pytest

# Model hubs are unreachable in CI: fail fast instead of retrying HTTP for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (4 logical CPUs on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
