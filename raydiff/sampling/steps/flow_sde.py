"""Flow-matching SDE step with log p(x_{σ'} | x_σ, c): the policy of Flow-GRPO's denoising MDP.

Forked from yifan123/flow_grpo `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`
(`sde_step_with_logprob`, sde_type='sde', commit 54809b5), which itself adapts
ddpo-pytorch's DDIM step. Rectified flow x_σ = (1−σ)·x_0 + σ·ε is sampled from σ=1
to 0 over the scheduler's `sigmas`; the step from σ = sigmas[i] to σ' = sigmas[i+1]
(dt = σ' − σ < 0) with noise level a:

    std_t = a·sqrt(σ / (1 − σ))            (σ = 1 uses 1 − sigmas[1] in the denominator, as the reference)
    mean  = x·(1 + std_t²/(2σ)·dt) + v·(1 + std_t²·(1−σ)/(2σ))·dt
    x'    = mean + std_t·sqrt(−dt)·z,   z ~ N(0, I)
    log π = log N(x'; mean, (std_t·sqrt(−dt))²), averaged over C·H·W

At a = 0 the mean is x + v·dt, diffusers' `FlowMatchEulerDiscreteScheduler.step` (and the
step is deterministic: no draw, log-prob NaN). Changes from the reference: the step is
given as a host index (no `index_for_timestep` lookup, no device sync); `a` may be a
per-sample tensor (an SDE window that differs between concatenated batches); a drawn x'
is rounded to the sample dtype *before* it is scored, so the stored log-prob is that of
the latent the next step consumes (DESIGN §8); all maths in float32 whatever the inputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from raydiff.sampling.steps.ddim import StepOutput, gaussian_log_prob


def sigma_pair(scheduler, step_index: int) -> tuple[float, float, float]:
    """(σ, σ', σ_max) for step `step_index` of a schedule set with `scheduler.set_timesteps(n)`."""
    sigmas = scheduler.sigmas
    if step_index + 1 >= len(sigmas):
        raise IndexError(f"step_index={step_index} out of range for {len(sigmas) - 1} steps")
    s = sigmas[step_index : step_index + 2].tolist()
    return float(s[0]), float(s[1]), float(sigmas[1])


def flow_std(sigma: float, sigma_max: float, noise_level: torch.Tensor) -> torch.Tensor:
    """std_t = a·sqrt(σ/(1−σ)); at σ = 1 the reference divides by 1 − sigmas[1] instead of 0."""
    denom = 1 - (sigma_max if sigma == 1 else sigma)
    return torch.sqrt(torch.tensor(sigma / denom, dtype=torch.float32)) * noise_level


def flow_sde_step(
    scheduler,
    v: torch.Tensor,
    step_index: int,
    x: torch.Tensor,
    noise_level: float | torch.Tensor,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> StepOutput:
    """One step x_σ -> x_σ' from the predicted velocity v (N, C, h, w); draws x' unless `prev_sample` is given.

    `noise_level` a: a float or a (N,) tensor; samples with a = 0 take the deterministic Euler step.
    Returns `StepOutput` with `std` = std_t·sqrt(−dt) shaped (N, 1, 1, 1) and `pred_original_sample`
    x̂_0 = x − σ·v; `log_prob` is NaN for samples with a = 0.
    """
    sigma, sigma_next, sigma_max = sigma_pair(scheduler, step_index)
    sample_dtype = x.dtype
    v32, x32 = v.float(), x.float()
    n = x.shape[0]
    a = torch.as_tensor(noise_level, dtype=torch.float32).to(x.device).expand(n).reshape(n, *([1] * (x.ndim - 1)))
    dt = sigma_next - sigma
    std_t = flow_std(sigma, sigma_max, a)
    mean = x32 * (1 + std_t**2 / (2 * sigma) * dt) + v32 * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    stochastic = a.flatten() > 0
    noise = None
    if prev_sample is None:
        prev_sample = mean
        if bool(stochastic.any()):
            noise = randn_tensor(v.shape, generator=generator, device=v.device, dtype=torch.float32)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.to(sample_dtype)  # what the next step consumes; scored as such
    log_prob = torch.full((n,), float("nan"), device=x.device)
    if bool(stochastic.any()):
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        lp = gaussian_log_prob(prev_sample, mean, safe_std)
        log_prob = torch.where(stochastic, lp, log_prob)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, pred_original_sample=x32 - sigma * v32, noise=noise)
