"""DDIM step that also returns log p(x_{t-1} | x_t, c): the policy of the denoising MDP.

Forked in spirit from diffusers 0.42 `DDIMScheduler.step` (same arithmetic
order, so eta=0 and eta=1 reproduce the pipeline bit-exactly on CPU) and from
ddpo-pytorch `diffusers_patch/ddim_with_logprob.py` (log-prob of the Gaussian
step). Changes from diffusers: returns the mean, std and log-prob; accepts a
given `prev_sample` to score instead of drawing one; the step's x̂_0, mean, std and
log-density in float32 whatever the sample dtype (a drawn x_{t-1} is rounded to
that dtype *before* it is scored, so the stored log-prob is that of the latent the
next step consumes); log-prob averaged over C*H*W (ddpo-pytorch and DAG tune their
step sizes for means); prev_t clamped to ≥ 0 as ddpo-pytorch, so the last step
uses ᾱ_0 (never σ = 0, whose log-prob is NaN, when `set_alpha_to_one` is true; with
it false, as in SD/SDXL, ᾱ_0 is diffusers' final value and nothing changes).
Only epsilon prediction with DDIM's `prev_t = t - T_train / n` is supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}, (N, C, h, w)
    log_prob: torch.Tensor  # (N,) float32, mean over C*h*w
    mean: torch.Tensor  # mean of the Gaussian step
    std: torch.Tensor  # scalar std of the Gaussian step (eta * sigma_t)
    pred_original_sample: torch.Tensor  # x̂_0 predicted from x_t
    noise: Optional[torch.Tensor] = None  # the standard-normal draw, when this step drew x_{t-1}


def alphas_at(scheduler, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ᾱ_t, ᾱ_prev, prev_t) for a DDIM schedule set with `scheduler.set_timesteps(n)`."""
    if scheduler.num_inference_steps is None:
        raise RuntimeError("call scheduler.set_timesteps(num_steps) before stepping: the log-prob depends on it")
    t = int(t)
    prev_t = max(0, t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps)  # ddpo-pytorch's clamp
    return scheduler.alphas_cumprod[t].float(), scheduler.alphas_cumprod[prev_t].float(), prev_t


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²) per element (same shape as x), in float32; x is a constant."""
    x, mean, std = x.float(), mean.float(), std.float()
    return -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²) per element, averaged over all non-batch dims, in float32."""
    lp = gaussian_log_density(x, mean, std)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def ddim_step(
    scheduler,
    eps: torch.Tensor,
    t: int | torch.Tensor,
    x_t: torch.Tensor,
    eta: float,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1}; draws x_{t-1} unless `prev_sample` is given, then scores it."""
    if scheduler.config.prediction_type != "epsilon":
        raise NotImplementedError(f"prediction_type={scheduler.config.prediction_type!r}; raydiff's DDIM step supports epsilon models")
    a_t, a_prev, prev_t = alphas_at(scheduler, t)
    sample_dtype = x_t.dtype
    step_dtype = torch.promote_types(torch.promote_types(x_t.dtype, eps.dtype), torch.float32)  # fp32, or fp64 when given
    a_t, a_prev = a_t.to(step_dtype), a_prev.to(step_dtype)  # 0-d CPU tensors join device maths as scalars: no copy, no sync
    eps32, x_t32 = eps.to(step_dtype), x_t.to(step_dtype)
    beta_t = 1 - a_t
    x0 = (x_t32 - beta_t ** (0.5) * eps32) / a_t ** (0.5)
    if scheduler.config.thresholding:
        raise NotImplementedError("dynamic thresholding is not supported with log-probs")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance ** (0.5)
    direction = (1 - a_prev - std**2) ** (0.5) * eps32
    mean = a_prev ** (0.5) * x0 + direction
    noise = None
    if prev_sample is None:
        prev_sample = mean
        if eta > 0:
            # Drawn in the model's dtype as diffusers does (same generator stream), applied in fp32.
            noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
            prev_sample = prev_sample + std * noise.to(step_dtype)
        prev_sample = prev_sample.to(sample_dtype)  # what the next step consumes; scored as such
    if eta > 0:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    else:
        log_prob = torch.full((eps.shape[0],), float("nan"), device=eps.device)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, pred_original_sample=x0, noise=noise)


def backward_log_prob(scheduler, t: int, x_t: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """log q(x_t | x_{t-1}) of the fixed forward noising kernel N(√(ᾱ_t/ᾱ_prev) x_{t-1}, (1-ᾱ_t/ᾱ_prev) I), mean over C*h*w."""
    a_t, a_prev, _ = alphas_at(scheduler, t)
    ratio = (a_t / a_prev).to(x_t.device).float()
    return gaussian_log_prob(x_t, ratio.sqrt() * x_prev.float(), (1 - ratio).sqrt())
