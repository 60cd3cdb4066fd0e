"""Sample trajectories with per-step log-probs (the rollout policy): DDIM here, flow SDE in flow_sampler.py.

Initial noise and step noise come from one generator in the same order as
diffusers' pipelines, so with the same seed the images equal
`StableDiffusion(XL)Pipeline(..., eta=eta)` output. The network is called through
the model's family (`model.family.predict`); `sample` picks the loop by the family's
step kind, so callers never test the model's kind.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from raydiff.models.sd import autocast_for  # noqa: F401  (re-exported: older callers import it from here)
from raydiff.sampling.steps.ddim import alphas_at, ddim_step
from raydiff.types import Conditioning, Trajectory


def predict_noise(model, x: torch.Tensor, t, cond: Conditioning, guidance_scale: float, unet=None, return_cond: bool = False):
    """The family's network output with guidance: ε̂ (SD/SDXL, CFG in one batched call) or v̂ (SD3/FLUX).

    `unet` overrides the model's denoiser (an assistant network); `return_cond=True` returns
    (output, conditional-branch output): the conditional branch comes free with CFG.
    """
    return model.family.predict(model, x, t, cond, guidance_scale, denoiser=unet, return_cond=return_cond)


@torch.no_grad()
def decode_images(model, latents: torch.Tensor, chunk: Optional[int] = None) -> np.ndarray:
    """Latents (N, C, h, w) -> uint8 images (N, H, W, 3), rounded like diffusers' numpy_to_pil.

    At most `chunk` latents go through the VAE per call (None = all): VAE activations grow with
    the batch (SDXL at 1024px: ~1.5 GiB per image in bf16), images on the host do not.
    """
    step = chunk or max(len(latents), 1)
    out = [(decode_float(model, latents[i:i + step]).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
           for i in range(0, len(latents), step)]
    return np.concatenate(out) if out else np.zeros((0, model.resolution, model.resolution, 3), np.uint8)


def decode_float(model, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float images (N, 3, H, W) in [0, 1]; keeps the graph (differentiable rewards use it)."""
    return model.family.decode(model, latents)


def predict_x0(scheduler, eps: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, clipped like `ddim_step` when the scheduler clips."""
    a_t = alphas_at(scheduler, t)[0].to(x_t.device)
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0


def initial_noise(model, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """x_T (N, C, h, w) as the family's diffusers pipeline draws it."""
    return model.family.initial_noise(model, n, generator)


@torch.no_grad()
def sample(
    model,
    cond: Conditioning,
    prompts: list[str],
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator: Optional[torch.Generator] = None,
    version: int = 0,
    keep_eps: bool = False,
    keep_x0: bool = False,
    keep_noise: bool = False,
    latents: Optional[torch.Tensor] = None,
    x0_guidance: str = "cfg",
    progress: bool = False,
    decode_chunk: Optional[int] = None,
    noise_level: float = 0.7,
    sde_window: Optional[tuple[int, int]] = None,
) -> Trajectory:
    """Run the denoising chain; returns latents x_T..x_0, log-probs, images.

    Flow families (SD3, FLUX) go to `flow_sampler.sample_flow` with `noise_level` a and the
    SDE window [start, end) of stochastic steps (None = all); `eta` and `keep_eps` are DDIM's.

    `keep_eps` stores ε̂ per step (extras['eps'], (N, T, C, h, w)); `keep_x0` stores the
    predicted x̂_0 per step (extras['x0_pred'], same shape) for intermediate rewards, from the CFG ε̂
    (`x0_guidance='cfg'`) or from the conditional branch alone (`'cond'`, free: CFG computes it anyway).
    `decode_chunk`: latents per VAE decode call for the final images (None = all at once).
    `keep_noise` stores the realised step noise z = (x_{t-1} − μ)/σ (extras['noise'], same shape):
    the behaviour policy's per-element log-density is −z²/2 − log σ − ½ log 2π.
    """
    if model.family.step_kind == "flow":
        from raydiff.sampling.flow_sampler import sample_flow

        return sample_flow(model, cond, prompts, num_steps, guidance_scale, noise_level, sde_window, generator, version,
                           keep_x0=keep_x0, keep_noise=keep_noise, latents=latents, progress=progress, decode_chunk=decode_chunk)
    sched = model.scheduler
    model.family.set_timesteps(model, num_steps)
    x = initial_noise(model, len(prompts), generator) if latents is None else latents
    xs, log_probs, eps_all, x0_all, noise_all = [x], [], [], [], []
    steps = sched.timesteps
    it = steps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(steps, desc="sampling", leave=False)
    # No host syncs in the loop: the DDIM maths indexes ᾱ with host ints (`int(t)` of a CUDA tensor
    # would sync every step) and kept tensors stay on the device until one copy after the loop.
    steps_host = [int(s) for s in steps.cpu()]
    for i, t in enumerate(it):
        t_host = steps_host[i]
        x_in = sched.scale_model_input(x, t)
        eps, eps_c = predict_noise(model, x_in, t, cond, guidance_scale, return_cond=True)
        x_t = x
        out = ddim_step(sched, eps, t_host, x_t, eta, generator=generator)
        x = out.prev_sample.to(model.dtype)
        xs.append(x)
        log_probs.append(out.log_prob)
        if keep_eps:
            eps_all.append(eps.float())
        if keep_x0:
            x0 = out.pred_original_sample if x0_guidance == "cfg" else predict_x0(sched, eps_c, t_host, x_t)
            x0_all.append(x0.float())
        if keep_noise and out.noise is not None:
            # The realised standard-normal draw of the *stored* x_{t-1} (rounded to the sample dtype):
            # (x_{t-1} − μ)/σ, so −z²/2 − log σ − ½ log 2π is exactly the per-element log-density scored.
            noise_all.append(((x.float() - out.mean.float()) / out.std.float()))
    traj = collect_trajectory(model, prompts, xs, steps, log_probs, cond, decode_chunk, version, guidance_scale, eta)
    if keep_eps:
        traj.extras["eps"] = torch.stack(eps_all, dim=1).cpu()
    if keep_x0:
        traj.extras["x0_pred"] = torch.stack(x0_all, dim=1).cpu()
    if noise_all:
        traj.extras["noise"] = torch.stack(noise_all, dim=1).cpu()
    return traj


def collect_trajectory(model, prompts, xs, steps, log_probs, cond, decode_chunk, version, guidance_scale, eta) -> Trajectory:
    """Decode the last latent and pack a sampling loop's per-step lists into a CPU Trajectory (DDIM and flow alike)."""
    return Trajectory(
        prompts=list(prompts),
        latents=torch.stack(xs, dim=1).cpu(),  # the sampling dtype (bf16 on GPU): exactly what each step consumed
        timesteps=steps.cpu(),
        log_probs=torch.stack(log_probs, dim=1).float().cpu(),
        cond=cond.to("cpu"),
        images=decode_images(model, xs[-1], decode_chunk),
        version=version,
        num_steps=len(xs) - 1,
        guidance_scale=guidance_scale,
        eta=eta,
    )
