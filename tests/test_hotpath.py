"""Hot-path levers: trajectories in the sampling dtype (re-scored exactly), learner metrics without per-step syncs."""

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
