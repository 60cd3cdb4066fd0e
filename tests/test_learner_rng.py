"""A learner checkpoint holds every random stream a train step draws from (issue #14: S = 0 bit-exact).

LoRA dropout draws from torch's global generator, minibatch order and timesteps from the learner's
own one. A restarted learner (new process, or a Ray Train rank restarted on another node) that
restored only the latter would train on other dropout masks than the uninterrupted run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raydiff.config import load_config
from raydiff.engine.learners.learner import Learner


def _draws(learner: Learner) -> tuple[torch.Tensor, torch.Tensor]:
    """What the next train step would see: a dropout mask (global stream), a permutation (the learner's)."""
    return F.dropout(torch.ones(256), 0.5, training=True), torch.randperm(256, generator=learner.rng)


def test_checkpoint_restores_the_dropout_and_minibatch_streams(tiny_sd, tmp_path):
    cfg = load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "model.lora.dropout=0.1"])
    learner = Learner(cfg)
    _draws(learner)  # the streams have moved on since the start, as after some epochs
    learner.save(str(tmp_path / "ckpt"))
    expected = _draws(learner)

    restarted = Learner(cfg)  # a fresh process would start from the seed again
    torch.manual_seed(12345)  # and its global stream can be anywhere by the time it loads
    restarted.load(str(tmp_path / "ckpt"))
    got = _draws(restarted)
    assert torch.equal(got[0], expected[0]), "dropout masks differ after a restore"
    assert torch.equal(got[1], expected[1]), "minibatch order differs after a restore"


def test_checkpoint_with_only_the_learner_stream_still_loads(tiny_sd):
    """Checkpoints written before the global streams were saved hold one generator state (a tensor)."""
    learner = Learner(load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}"]))
    old = torch.Generator().manual_seed(7)
    learner.set_rng_state(old.get_state())
    assert torch.equal(torch.randperm(16, generator=learner.rng), torch.randperm(16, generator=old))


def test_ranks_draw_their_own_dropout_masks_from_identical_weights(tiny_sd):
    """Learner ranks start from identical LoRA weights but do not share dropout masks (rank 0's stream as alone)."""
    cfg = load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "model.lora.dropout=0.1"])
    draws, weights = [], []
    for rank in (0, 1, 0):
        learner = Learner(cfg, rank=rank, world_size=2)
        weights.append(learner.publish()["checksum"])
        draws.append(F.dropout(torch.ones(256), 0.5, training=True))
    assert weights[0] == weights[1] == weights[2]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
