"""Shared pytest fixtures: one Ray cluster per session and the reward service on it."""

from __future__ import annotations

import os
import tempfile

import pytest

# Model hubs are unreachable in CI: fail fast instead of retrying HTTP for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One cache of tiny models per test session, built through the same code path as
# `tiny://` in user configs; set before ray.init so every actor sees it.
os.environ.setdefault("RAYDIFF_CACHE", tempfile.mkdtemp(prefix="raydiff-test-cache-"))
# Credentials for the session's S3-API test server (moto accepts any); set before ray.init so
# Ray workers that open s3:// run storage have them too.
from _s3 import CREDS  # noqa: E402

for _k, _v in CREDS.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (8 logical CPUs on a 2-core machine: roles are small)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd() -> str:
    """Folder of the session's tiny SD model (built once, loaded by path like a real model)."""
    from raydiff.models.tiny import resolve_tiny

    return resolve_tiny("tiny://sd")


@pytest.fixture(scope="session")
def tiny_sdxl() -> str:
    from raydiff.models.tiny import resolve_tiny

    return resolve_tiny("tiny://sdxl")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedRewards:
    """What tests need to reach the session's reward service."""

    def __init__(self, cfg, url: str, tiny_clip: str):
        self.cfg, self.url, self.tiny_clip, self.app_name = cfg, url, tiny_clip, cfg.app_name

    def component(self, name: str, weight: float = 1.0) -> dict:
        """The served reward `name` as a trainer reward component (same config hash, so the run reuses it)."""
        return {**self.cfg.reward(name).model_dump(mode="json"), "weight": weight}

    def trainer_overrides(self, *names: str) -> list[str]:
        """Overrides that point a training run at this service (reward.backend=serve) for rewards `names`."""
        import json

        comps = [self.component(n) for n in (names or ("brightness",))]
        return ["reward.backend=serve", f"reward.serve_app={self.app_name}", f"reward.components={json.dumps(comps)}"]


@pytest.fixture(scope="session")
def serve_rewards(ray_cluster, tmp_path_factory):
    """The reward service (tiny CLIP + brightness) on Serve, HTTP on a random 127.0.0.1 port; one per session.

    brightness runs 2 replicas (a test kills one), clip is clip_score on the tiny CLIP.
    """
    from ray import serve

    from raydiff.rewards.serve import deploy
    from raydiff.rewards.service_config import RewardServiceConfig
    from raydiff.models.tiny_clip import build_tiny_clip

    tiny = build_tiny_clip(tmp_path_factory.mktemp("served") / "tiny_clip")
    cfg = RewardServiceConfig(
        port=free_port(),
        app_name="raydiff-rewards",
        max_body_bytes=2**20,
        max_images_per_request=64,
        max_image_pixels=1024 * 1024,
        rewards=[
            dict(name="brightness", num_replicas=2, num_cpus=0.1, max_batch_size=16, batch_wait_timeout_s=0.05,
                 max_ongoing_requests=32),
            dict(name="clip", reward="clip_score", args={"clip_path": tiny}, num_cpus=0.1, weight=0.5,
                 batch_wait_timeout_s=0.02),
        ],
    )
    url = deploy(cfg)
    yield ServedRewards(cfg, url, tiny)
    try:
        serve.delete(cfg.app_name)
    except Exception:
        pass


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-API server (moto server mode) on 127.0.0.1 for the session; stopped by its process group."""
    from _s3 import S3Server

    with S3Server() as server:
        yield server


def train_config(config: str, run_dir, *overrides: str):
    """Run `config` end to end through the Trainer into `run_dir` (quietly); returns (cfg, run_dir)."""
    from raydiff.config import load_config
    from raydiff.engine.trainer import Trainer

    cfg = load_config(config, [f"output.run_dir={run_dir}", "output.progress=false", *overrides])
    Trainer(cfg).run()
    return cfg, run_dir
