r"""One differentiable DDIM sampler for reward-backprop learners (AlignProp, DRaFT-K/LV, DRTune).

The chain x_T → x_0 over T DDIM steps (CFG in one batched UNet call, SD and SDXL
conditioning) keeps the autograd graph where a `GradPlan` asks for it:

- `grad_steps`: chain indices i (0 = the step from x_T, T−1 = the step to x_0)
  whose UNet call is differentiated; every other UNet call runs under
  `no_grad`, so its ε̂ is a constant.
- `truncate=True` (AlignProp, DRaFT-K): every step before min(grad_steps) runs
  entirely under `no_grad` and x is detached there: truncated backprop, no
  graph at all for the early chain. `truncate=False` (DRTune): x keeps its
  graph through the (linear) DDIM update of every step, so gradients reach
  early trained steps.
- `stop_grad_input=True` (DRTune): the UNet sees sg(x_t). The gradient then
  flows through each step's linear update (a scalar factor per step) and into
  the parameters through ε̂, but never through the UNet's input Jacobian, the
  product of which explodes over long chains.
- `stop_at=m`: sample only steps 0..m and return x̂_0 predicted at step m
  (DRTune's early stop) instead of x_0.
- `lv_renoise=n` (DRaFT-LV): n extra copies sg(x_0) re-noised to the last
  step's level, x_t' = √ᾱ_t sg(x_0) + √(1−ᾱ_t) ε', each denoised by one
  differentiated step; returned next to x_0 for the learner to average.

Per-UNet-call activation checkpointing (`torch.utils.checkpoint`,
`use_reentrant=False`) keeps memory at one UNet's activations per trained
step; the VAE decode can be checkpointed the same way. Randomness (x_T, the
η > 0 step noise, LV noise) is drawn outside checkpointed regions from one
generator, so a seed fixes the result and recomputation is exact.

Numerics follow `raydiff.sampling.sampler` (same `predict_noise`, same
`ddim_step`), so with no gradients the chain equals the rollout sampler's.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from raydiff.sampling.steps.ddim import alphas_at, ddim_step
from raydiff.sampling.sampler import decode_float, initial_noise, predict_noise
from raydiff.types import Conditioning


@dataclass(frozen=True)
class GradPlan:
    """Which UNet calls of a T-step chain are differentiated, and how the gradient may travel."""

    num_steps: int  # T: DDIM steps of the schedule (scheduler.set_timesteps(T))
    grad_steps: frozenset  # chain indices in [0, T) whose UNet call keeps its graph
    truncate: bool = True  # no graph at all before min(grad_steps) (truncated backprop)
    stop_grad_input: bool = False  # UNet input is sg(x_t) (DRTune)
    stop_at: Optional[int] = None  # last chain index run; x̂_0 there is returned (None: run to x_0)
    lv_renoise: int = 0  # DRaFT-LV: extra re-noised one-step denoisings of sg(x_0)

    def __post_init__(self):
        T = self.num_steps
        if T < 1:
            raise ValueError(f"num_steps must be >= 1, got {T}")
        bad = [i for i in self.grad_steps if not 0 <= i < T]
        if bad:
            raise ValueError(f"grad_steps {sorted(bad)} outside the chain [0, {T})")
        if self.stop_at is not None and not 0 <= self.stop_at < T:
            raise ValueError(f"stop_at={self.stop_at} outside the chain [0, {T})")
        if self.stop_at is not None and self.lv_renoise:
            raise ValueError("lv_renoise re-noises the final x_0; it cannot be combined with stop_at")
        if self.lv_renoise < 0:
            raise ValueError(f"lv_renoise must be >= 0, got {self.lv_renoise}")

    @property
    def last_step(self) -> int:
        return self.num_steps - 1 if self.stop_at is None else self.stop_at


# --- plans used by the algorithms ------------------------------------------------------------


def last_k(num_steps: int, k: int, **kw) -> GradPlan:
    """Backprop through the last k steps only (DRaFT-K; k = T is full backprop)."""
    k = max(0, min(int(k), num_steps))
    return GradPlan(num_steps, frozenset(range(num_steps - k, num_steps)), **kw)


def random_last_k(num_steps: int, k_min: int, k_max: int, rng: random.Random, **kw) -> GradPlan:
    """AlignProp's randomised truncation: K ~ U{k_min..k_max}, then the last K steps."""
    k_min, k_max = max(1, min(k_min, num_steps)), max(1, min(k_max, num_steps))
    return last_k(num_steps, rng.randint(min(k_min, k_max), max(k_min, k_max)), **kw)


def spread_steps(num_run: int, k: int, rng: random.Random) -> frozenset:
    """K indices spread evenly over [0, num_run) with a random phase: stride s = num_run // K,
    steps offset + s·j (j < K), offset ~ U{0..s−1}; the first stride (early steps) is always covered."""
    k = max(1, min(int(k), num_run))
    stride = num_run // k
    offset = rng.randrange(stride)
    return frozenset(offset + stride * j for j in range(k))


# --- the sampler -----------------------------------------------------------------------------


@dataclass
class DifferentiableSample:
    """What `sample_with_grad` returns; latents are (N, C, h, w) and keep the graph per the plan."""

    latents: torch.Tensor  # supervised latents: x_0, or x̂_0 at stop_at
    x_T: torch.Tensor  # initial noise (the tensor passed in or drawn)
    plan: GradPlan
    lv_latents: list = field(default_factory=list)  # DRaFT-LV: n one-step denoisings of re-noised sg(x_0)
    reg: Optional[torch.Tensor] = None  # Σ over trained UNet calls of mean (ε̂ − ε̂_ref)², None without a reference
    unet_calls: int = 0  # UNet calls made (each a CFG-batched call)
    unet_calls_with_grad: int = 0


def _eps(model, x, t, cond: Conditioning, guidance_scale: float, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return _checkpoint(predict_noise, model, x, t, cond, guidance_scale, use_reentrant=False)
    return predict_noise(model, x, t, cond, guidance_scale)


def sample_with_grad(
    model,
    cond: Conditioning,
    plan: GradPlan,
    guidance_scale: float,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    latents: Optional[torch.Tensor] = None,
    checkpointing: bool = True,
    reference: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
) -> DifferentiableSample:
    """Run the DDIM chain of `plan` with gradients where it says.

    `latents`: x_T (N, C, h, w); drawn like the rollout sampler when None. `reference`: a
    factory of a context under which `model.unet` is the frozen reference (e.g. LoRA
    adapters disabled); when given, every differentiated UNet call also computes ε̂_ref
    under no_grad and `reg` sums mean (ε̂ − ε̂_ref)² over them.
    """
    sched = model.scheduler
    model.family.set_timesteps(model, plan.num_steps)
    timesteps = sched.timesteps
    n = cond.embeds.shape[0]
    x = initial_noise(model, n, generator) if latents is None else latents
    x_T = x
    first_grad = min(plan.grad_steps) if plan.grad_steps else plan.num_steps
    out_latents, reg, calls, grad_calls = None, None, 0, 0
    for i in range(plan.last_step + 1):
        t = timesteps[i]
        differentiate = i in plan.grad_steps and torch.is_grad_enabled()
        untracked = plan.truncate and i < first_grad
        if plan.truncate and i == first_grad and i > 0:
            x = x.detach()  # truncated backprop: nothing before the first trained step (x_T included)
        with torch.no_grad() if untracked else contextlib.nullcontext():
            x_in = sched.scale_model_input(x, t)
            unet_in = x_in.detach() if plan.stop_grad_input else x_in
            if differentiate:
                eps = _eps(model, unet_in, t, cond, guidance_scale, checkpointing)
                grad_calls += 1
                if reference is not None:
                    with torch.no_grad(), reference():
                        eps_ref = predict_noise(model, unet_in.detach(), t, cond, guidance_scale)
                    d = ((eps.float() - eps_ref.float()) ** 2).mean()
                    reg = d if reg is None else reg + d
            else:
                with torch.no_grad():
                    eps = predict_noise(model, unet_in, t, cond, guidance_scale)
            calls += 1
            step = ddim_step(sched, eps, t, x, eta, generator=generator)
            x = step.prev_sample.to(model.dtype)
        if plan.stop_at is not None and i == plan.stop_at:
            out_latents = step.pred_original_sample.to(model.dtype)
    if out_latents is None:
        out_latents = x
    lv = []
    if plan.lv_renoise:
        t = timesteps[plan.num_steps - 1]
        a_t = alphas_at(sched, t)[0].to(x.device, torch.float32)
        x0 = out_latents.detach()
        for _ in range(plan.lv_renoise):
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = (a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * noise.float()).to(model.dtype)
            x_in = sched.scale_model_input(x_t, t)
            eps = _eps(model, x_in, t, cond, guidance_scale, checkpointing)
            calls += 1
            grad_calls += int(torch.is_grad_enabled())
            if reference is not None and torch.is_grad_enabled():
                with torch.no_grad(), reference():
                    eps_ref = predict_noise(model, x_in, t, cond, guidance_scale)
                d = ((eps.float() - eps_ref.float()) ** 2).mean()
                reg = d if reg is None else reg + d
            lv.append(ddim_step(sched, eps, t, x_t, eta, generator=generator).prev_sample.to(model.dtype))
    return DifferentiableSample(out_latents, x_T, plan, lv, reg, calls, grad_calls)


def decode_with_grad(model, latents: torch.Tensor, checkpointing: bool = True) -> torch.Tensor:
    """Differentiable decode to [0, 1] images (N, 3, H, W), optionally recomputing the VAE in backward."""
    if checkpointing and torch.is_grad_enabled() and latents.requires_grad:
        return _checkpoint(decode_float, model, latents, use_reentrant=False)
    return decode_float(model, latents)


@contextlib.contextmanager
def adapters_disabled(unet):
    """The frozen base model: peft LoRA adapters of a diffusers UNet switched off for the block."""
    if not getattr(unet, "peft_config", None):
        raise ValueError("a reference through disabled adapters needs model.finetune=lora (no LoRA adapters on this UNet)")
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
