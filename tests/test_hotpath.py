"""Hot-path levers: trajectories in the sampling dtype (re-scored exactly), learner metrics without per-step syncs."""

import torch

from raydiff.config import ModelSection
from raydiff.engine.policy import Policy
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
