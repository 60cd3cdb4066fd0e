"""Flow-GRPO SDE step: Euler limit, Gaussian log-density, and the reference implementation step for step."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from raydiff.sampling.steps.flow_sde import flow_sde_step


def _sched(n=6, shift=3.0):
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(n)
    return s


def _reference_step(sched, v, i, x, a, prev_sample=None, generator=None):
    """yifan123/flow_grpo sde_step_with_logprob (sde_type='sde'), written out from its formulas."""
    v, x = v.float(), x.float()
    sigma, sigma_prev, sigma_max = sched.sigmas[i], sched.sigmas[i + 1], sched.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    if prev_sample is None:
        prev_sample = mean + std_dev_t * torch.sqrt(-1 * dt) * randn_tensor(v.shape, generator=generator, dtype=v.dtype)
    lp = (-((prev_sample - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
          - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev_sample, lp.mean(dim=(1, 2, 3)), mean


def test_zero_noise_mean_is_the_diffusers_euler_step():
    sched = _sched()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        ref = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
        ref.set_timesteps(len(sched.timesteps))
        ref._step_index = i
        want = ref.step(v, t, x, return_dict=False)[0]
        out = flow_sde_step(sched, v, i, x, 0.0)
        torch.testing.assert_close(out.mean, want, rtol=0, atol=1e-6)
        assert torch.equal(out.prev_sample, out.mean.to(x.dtype)) and out.noise is None
        assert torch.isnan(out.log_prob).all()


def test_log_prob_is_torch_normal_on_the_same_mean_and_std():
    sched = _sched()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for i in range(len(sched.timesteps)):
        out = flow_sde_step(sched, v, i, x, 0.7, generator=g)
        want = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, want, rtol=1e-5, atol=1e-5)
        assert out.std.shape == (3, 1, 1, 1) and (out.std > 0).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_matches_the_reference_step_for_step(shift):
    """Same draws, same σ=1 handling at the first step (1 − sigmas[1]), dt = σ' − σ < 0."""
    sched = _sched(5, shift)
    assert sched.sigmas[0] == 1  # the σ = 1 branch is exercised at step 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ours, x_ref = x.clone(), x.clone()
    for i in range(len(sched.timesteps)):
        v = torch.tanh(x_ours) * 0.5 - 0.1 * x_ours  # any deterministic "velocity"
        out = flow_sde_step(sched, v, i, x_ours, 0.7, generator=g_ours)
        prev, lp, mean = _reference_step(sched, torch.tanh(x_ref) * 0.5 - 0.1 * x_ref, i, x_ref, 0.7, generator=g_ref)
        torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.prev_sample, prev, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.log_prob, lp, rtol=1e-5, atol=1e-5)
        # Re-scoring the stored sample gives the sampled log-prob exactly.
        again = flow_sde_step(sched, v, i, x_ours, 0.7, prev_sample=out.prev_sample)
        assert torch.equal(again.log_prob, out.log_prob)
        x_ours, x_ref = out.prev_sample, prev


def test_window_mixes_stochastic_and_deterministic_samples():
    sched = _sched()
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = flow_sde_step(sched, v, 2, x, torch.tensor([0.0, 0.7]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample[0], (x + v * (sched.sigmas[3] - sched.sigmas[2]))[0], rtol=0, atol=1e-6)
    assert torch.isnan(out.log_prob[0]) and torch.isfinite(out.log_prob[1])


def test_bf16_sample_is_scored_as_the_next_step_consumes_it():
    sched = _sched()
    x, v = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    out = flow_sde_step(sched, v, 1, x, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.bfloat16 and out.mean.dtype == torch.float32
    rescored = flow_sde_step(sched, v, 1, x, 0.7, prev_sample=out.prev_sample)
    assert torch.equal(rescored.log_prob, out.log_prob)
