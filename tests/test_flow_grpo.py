"""Flow-GRPO on a real (tiny) model: the KL to the LoRA-off reference, advantages in prepare, the CFG-free check."""

import numpy as np
import pytest
import torch

from raydiff.algorithms.flow_grpo import FlowGRPO
from raydiff.config import load_config
from raydiff.config_base import ConfigError
from raydiff.engine.learners.learner import Learner
from raydiff.engine.rollouts.worker import RolloutWorker

CONFIG = "configs/tiny_flow_grpo.yaml"


def _setup(model_path, **over):
    extra = [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(CONFIG, [f"model.path={model_path}", "sampling.batch_size=4", "sampling.num_steps=3", "learner.engine=torch",
                               "algorithm.group_size=2", "algorithm.train_batch_size=4", *extra])
    learner = Learner(cfg)
    batch = RolloutWorker(cfg, needs=learner.algorithm.needs).generate(["a cat", "a cat", "a dog", "a dog"], seed=3)
    batch.group_ids = torch.tensor([0, 0, 1, 1])
    return learner, batch


@pytest.mark.parametrize("model_path", ["tiny://sd3", "tiny://sd"])
def test_kl_is_zero_at_init_and_its_gradient_points_back_to_the_reference(model_path):
    """Flow SDE steps (SD3) and DDIM steps (SD): KL = 0 with a fresh LoRA, and −∇KL moves back to the base."""
    learner, batch = _setup(model_path)
    policy, params = learner.policy, learner.model.trainable_parameters()

    def kl_at(j=1):
        out = policy.step(batch, j)[0]
        return FlowGRPO.reference_kl(policy, batch, j, out).mean()

    kl0 = kl_at()
    kl0.backward()
    assert kl0.item() == 0.0  # fresh LoRA (B = 0): the policy is the base model
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in params)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the base
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    for p in params:
        p.grad = None
    kl1 = kl_at()
    kl1.backward()
    assert kl1.item() > 0
    with torch.no_grad():  # a small step along −∇KL lowers it: the gradient points back to the reference
        for p in params:
            p.sub_(1e-3 * p.grad / max(torch.cat([q.grad.flatten() for q in params]).norm(), 1e-12))
        kl2 = kl_at()
    assert kl2.item() < kl1.item()
    # the LoRA is switched back on after the reference forward
    with torch.no_grad():
        assert kl_at().item() == pytest.approx(kl2.item(), rel=1e-6)


def test_prepare_gives_group_relative_advantages_and_one_training_round():
    learner, batch = _setup("tiny://sd3", **{"algorithm.global_std": "false"})
    batch.rewards = np.array([1.0, 3.0, 5.0, 5.0])
    batch = learner.algorithm.prepare(batch)
    np.testing.assert_allclose(batch.advantages.numpy(), [-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0, 0], rtol=1e-6)
    metrics = learner.train(batch)
    assert metrics["train/optimizer_steps"] == 1 and np.isfinite(metrics["train/loss"])
    assert metrics["train/ratio_max_dev"] < 1e-4  # π_old = the learner's weights at the first step: ratio 1
    assert metrics["train/kl"] == 0.0


def test_cfg_false_needs_guidance_one():
    with pytest.raises((ConfigError, ValueError), match=r"algorithm.cfg=false.*sampling.guidance_scale=1"):
        load_config(CONFIG, ["algorithm.cfg=false", "sampling.guidance_scale=4.5"])
    load_config(CONFIG, ["algorithm.cfg=false", "sampling.guidance_scale=1"])
