"""The embedded default trains DDPO on a local Ray cluster: reward rises, outputs land, resume continues."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydiff.config import load_config
from raydiff.engine import checkpoint as ckpt
from raydiff.engine.learner import Learner
from raydiff.engine.metrics import read_metrics
from raydiff.engine.trainer import Trainer
from raydiff.models.lora import state_checksum, trainable_state_dict


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_ddpo")
    cfg = load_config("configs/tiny_ddpo.yaml", [f"output.run_dir={run_dir}", "output.progress=false"])
    Trainer(cfg).run()
    return cfg, run_dir


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


def test_resume_restores_weights_and_continues(tiny_run, ray_cluster):
    cfg, run_dir = tiny_run
    last = ckpt.latest_checkpoint(run_dir)
    saved = torch.load(last / "learner" / "learner.pt", weights_only=False)["weights"]
    learner = Learner(cfg)
    learner.load(str(last / "learner"))
    assert state_checksum(trainable_state_dict(learner.model.unet)) == state_checksum(saved)
    assert learner.version == cfg.train.num_epochs

    more = cfg.train.num_epochs + 2
    cfg2 = load_config("configs/tiny_ddpo.yaml", [f"output.run_dir={run_dir}", "output.progress=false", "output.resume=auto",
                                                  f"train.num_epochs={more}"])
    Trainer(cfg2).run()
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(more)), steps
    assert read_metrics(run_dir)[-1]["policy/version"] == more
