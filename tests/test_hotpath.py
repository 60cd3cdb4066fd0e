"""Hot-path levers: trajectories in the sampling dtype (re-scored exactly), learner metrics without per-step syncs."""

import pytest
import torch

from raydiff.config import ModelSection
from raydiff.sampling.policy import Policy
from raydiff.models.loader import load_model
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import sample

PROMPTS = ["a cat", "a red dog"]


def test_trajectory_kept_in_sampling_dtype_and_rescored_exactly(tiny_sd):
    m = load_model(ModelSection(path=tiny_sd, dtype="bfloat16"))
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    traj = sample(m, encode_prompts(m, PROMPTS, ""), PROMPTS, 3, 5.0, 1.0, torch.Generator().manual_seed(0))
    assert traj.latents.dtype == torch.bfloat16  # half the bytes of fp32 through the object store
    assert traj.log_probs.dtype == torch.float32  # log-prob maths stays fp32
    policy = Policy(m)
    with torch.no_grad():
        for j in range(3):
            assert torch.equal(policy.log_prob(traj, j).cpu(), traj.log_probs[:, j])  # exactly what the sampler scored


def test_step_averager_reads_device_scalars_once_and_matches_floats():
    """The learner's statistics stay 0-d tensors per step; the minibatch result equals the float arithmetic."""
    from raydiff.algorithms.common import StepAverager, decoupled_ppo_terms

    g = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(3):
        lp, prox, beh, adv = (torch.randn(5, generator=g) * 0.1 for _ in range(4))
        per_step.append(decoupled_ppo_terms(lp, prox, beh, adv, 0.05, 1.5)[1])
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in per_step[0].values())  # no .item() per step
    avg = StepAverager(3)
    for s in per_step:
        avg.add({**s, "loss": s["ratio_mean"] * 2, "count": 1.0})
    out = avg.result()
    assert all(isinstance(v, float) for v in out.values())
    for k in per_step[0]:
        vals = [float(s[k]) for s in per_step]
        expected = max(vals) if k.endswith("max_dev") else sum(v / 3 for v in vals)
        assert abs(out[k] - expected) < 1e-6, k
    assert abs(out["count"] - 1.0) < 1e-6


class GradOnly:
    """The stepper contract without the step: backward(loss / accumulation), gradients kept for the test."""

    def __init__(self):
        self.n = 1

    def set_accumulation(self, n):
        self.n = n

    def backward(self, loss, groups=None):
        (loss / self.n).backward()
        return False


@pytest.mark.parametrize("family", ["tiny_sd", "tiny_sdxl"])
def test_timesteps_per_forward_batches_steps_into_one_call_with_the_same_gradient(family, request):
    """algorithm.timesteps_per_forward=k scores k steps per UNet call; the update's gradient equals one call per step
    (SDXL: the pooled embeddings and time ids are repeated with the rows)."""
    tiny_sd = request.getfixturevalue(family)
    from raydiff.config import load_config
    from raydiff.engine.learners.learner import Learner
    from raydiff.engine.rollouts.worker import RolloutWorker

    grads, calls = {}, {}
    for k in (1, 2, 4):  # 4 steps: chunks of 1, 2 and all
        cfg = load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "sampling.num_steps=4", "sampling.batch_size=3",
                                                      "learner.engine=torch", "learner.num_workers=1", "rollout.num_workers=1",
                                                      "algorithm.per_prompt_stat_tracking=false", f"algorithm.timesteps_per_forward={k}"])
        learner = Learner(cfg)
        worker = RolloutWorker(cfg, needs=learner.algorithm.needs)
        worker.set_weights(learner.publish())
        batch = learner.algorithm.prepare(worker.generate(["a cat", "a dog", "a red bird"], 7))
        params = [p for p in learner.model.unet.parameters() if p.requires_grad]
        for stale in (0, 1):  # fresh: the stored log-probs; stale: the per-element decoupled objective
            b = batch.index(torch.arange(len(batch)))
            b.staleness, b.max_staleness = torch.full((len(b),), stale), stale
            b = learner.algorithm.prepare_batch(learner.policy, b)
            n_calls = []
            hook = learner.model.unet.register_forward_hook(lambda *a: n_calls.append(1))
            stepper = GradOnly()
            stepper.set_accumulation(learner.algorithm.micro_steps_per_update(b))
            learner.algorithm.train_step(learner.policy, stepper, b, torch.Generator().manual_seed(0))
            hook.remove()
            grads[k, stale], calls[k, stale] = torch.cat([p.grad.flatten() for p in params]), len(n_calls)
            for p in params:
                p.grad = None
    assert calls == {(1, 0): 4, (2, 0): 2, (4, 0): 1, (1, 1): 4, (2, 1): 2, (4, 1): 1}
    for stale in (0, 1):
        assert grads[1, stale].norm() > 0
        for k in (2, 4):  # equal up to the float summation order of bigger batches
            assert (grads[k, stale] - grads[1, stale]).norm() / grads[1, stale].norm() < 1e-4
