"""The embedded default trains DDPO on a local Ray cluster: reward rises, outputs land, resume continues."""

import json

import numpy as np
import pytest
from conftest import train_config

from raydiff.engine import checkpoint as ckpt
from raydiff.engine.metrics import read_metrics


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    return train_config("configs/tiny_ddpo.yaml", tmp_path_factory.mktemp("tiny_ddpo"))


def test_reward_rises(tiny_run):
    cfg, run_dir = tiny_run
    rewards = [m["reward/mean"] for m in read_metrics(run_dir)]
    assert len(rewards) == cfg.train.num_epochs
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.015, f"reward did not rise: first epochs {rewards[:3]}, last {rewards[-3:]}"


def test_run_outputs(tiny_run):
    cfg, run_dir = tiny_run
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((run_dir / "samples").glob("step_*.png"))) == cfg.train.num_epochs
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/mean", "train/approx_kl", "train/clipfrac", "policy/staleness", "time/learner_step_s", "time/sync_s"):
        assert key in first, key
    last = ckpt.latest_checkpoint(run_dir)
    assert last.name == f"step_{cfg.train.num_epochs - 1:06d}"
    assert (last / "learner" / "export" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_continues_step_count_and_metrics(tiny_run, ray_cluster):
    """`resume: auto` continues from the latest checkpoint: no repeated or missing steps, versions continue.
    (Bit-identical restore after a killed process: tests/test_engine.py.)"""
    cfg, run_dir = tiny_run
    more = cfg.train.num_epochs + 2
    train_config("configs/tiny_ddpo.yaml", run_dir, "output.resume=auto", f"train.num_epochs={more}")
    rows = read_metrics(run_dir)
    assert [m["step"] for m in rows] == list(range(more))
    assert rows[-1]["policy/version"] == more


def test_ddpo_with_served_rewards(serve_rewards, tmp_path):
    """reward.backend=serve: rollouts score through the Serve deployment handles (the session's service)."""
    cfg, run_dir = train_config("configs/tiny_ddpo.yaml", tmp_path, *serve_rewards.trainer_overrides("brightness"),
                                "train.num_epochs=3", "learner.engine=torch", "output.tensorboard=false")
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    for r in rows:
        assert 0.0 < r["reward/brightness"] < 1.0 and r["reward/mean"] == pytest.approx(r["reward/brightness"])
