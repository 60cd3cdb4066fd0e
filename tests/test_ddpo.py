"""DDPO's loss, advantages and the first-step ratio."""

import numpy as np
import pytest
import torch

from raydiff.algorithms.ddpo import PerPromptStats, ppo_clipped_loss
from raydiff.config import load_config
from raydiff.engine.learners.learner import Learner
from raydiff.engine.rollouts.worker import RolloutWorker


def test_ppo_loss_hand_computed():
    lp = torch.tensor([0.0, 0.1, -0.2])
    old = torch.tensor([0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, 2.0, -1.0])
    loss, stats = ppo_clipped_loss(lp, old, adv, clip_range=0.05)
    r = np.exp([0.0, 0.1, -0.2])
    per = [max(-1 * r[0], -1 * 1.0), max(-2 * r[1], -2 * 1.05), max(1 * r[2], 1 * 0.95)]
    assert loss.item() == pytest.approx(np.mean(per), abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(0.5 * np.mean([0, 0.01, 0.04]), abs=1e-7)


def test_per_prompt_stats_use_global_until_min_count():
    s = PerPromptStats(buffer_size=4, min_count=2)
    a1 = s.advantages(["x", "y"], np.array([1.0, 3.0]))
    assert a1 == pytest.approx([-1.0, 1.0], abs=1e-5)  # one reward each: batch statistics
    a2 = s.advantages(["x", "x"], np.array([2.0, 4.0]))  # x now has [1, 2, 4]
    buf = np.array([1.0, 2.0, 4.0])
    assert a2 == pytest.approx((np.array([2.0, 4.0]) - buf.mean()) / (buf.std() + 1e-6), abs=1e-5)
    s2 = PerPromptStats(4, 2)
    s2.load_state_dict(s.state_dict())
    assert list(s2.buffers["x"]) == [1.0, 2.0, 4.0]


def test_ratio_is_one_at_first_inner_step(tiny_sd):
    cfg = load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "sampling.batch_size=4", "sampling.num_steps=4", "learner.engine=torch",
                                                 "algorithm.train_batch_size=4"])
    worker = RolloutWorker(cfg)
    learner = Learner(cfg)
    batch = learner.algorithm.prepare(worker.generate(["a cat", "a dog", "a cow", "a cat"], seed=1))
    for j in range(batch.log_probs.shape[1]):
        with torch.no_grad():
            lp = learner.policy.log_prob(batch, j)
        ratio = torch.exp(lp - batch.log_probs[:, j])
        assert (ratio - 1).abs().max().item() < 1e-5
    metrics = learner.train(batch)
    assert metrics["train/optimizer_steps"] == 1 and learner.version == 1


def test_proximal_log_probs_on_the_real_model(tiny_sd):
    """Fresh batch: π_prox is the stored log-probs. Stale batch after a weight change: π_prox is the
    current weights' log-prob of the stored transition, and training reports w ≠ 1 against π_b."""
    from raydiff.algorithms.common import PROX_CURRENT_KEY, PROX_ELEM_KEY, PROX_KEY, attach_proximal_log_probs

    cfg = load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "sampling.batch_size=2", "sampling.num_steps=3",
                                                 "learner.engine=torch", "algorithm.train_batch_size=2"])
    learner = Learner(cfg)
    worker = RolloutWorker(cfg, needs=learner.algorithm.needs)  # DDPO keeps the step noise (per-element stale objective)
    batch = learner.algorithm.prepare(worker.generate(["a cat", "a dog"], seed=3))
    fresh = learner.algorithm.prepare_batch(learner.policy, batch)
    assert torch.equal(fresh.extras[PROX_KEY], batch.log_probs)
    with torch.no_grad():
        for n, p in learner.model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch.staleness, batch.max_staleness = torch.ones(2, dtype=torch.int64), 1
    deferred = learner.algorithm.prepare_batch(learner.policy, batch)  # one minibatch: π_prox comes from its forward
    assert PROX_KEY not in deferred.extras and deferred.extras[PROX_CURRENT_KEY].all()
    stale = attach_proximal_log_probs(learner.policy, batch, per_element=True)
    with torch.no_grad():
        torch.testing.assert_close(stale.extras[PROX_KEY][:, 1], learner.policy.log_prob(batch, 1), atol=1e-6, rtol=0)
    assert (stale.extras[PROX_KEY] - batch.log_probs).abs().max() > 1e-4
    assert stale.extras[PROX_ELEM_KEY].shape == batch.latents[:, 1:].shape  # per-element π_prox for the stale samples
    metrics = learner.train(batch)
    assert metrics["train/is_weight_max_dev"] > 0 and metrics["train/behaviour_approx_kl"] > 0
    assert metrics["train/ratio_max_dev"] < 1e-5  # one minibatch: θ = π_prox throughout its step
