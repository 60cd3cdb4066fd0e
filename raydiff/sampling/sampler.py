"""Sample DDIM trajectories with per-step log-probs (the rollout policy).

Initial noise and step noise come from one generator in the same order as
diffusers' pipelines, so with the same seed the images equal
`StableDiffusion(XL)Pipeline(..., eta=eta)` output. CFG runs both branches in
one batched UNet call (negative first, as diffusers does).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from raydiff.sampling.ddim import alphas_at, ddim_step
from raydiff.types import Conditioning, Trajectory


def autocast_for(model):
    """bf16/fp16 autocast on GPU when the frozen weights are half precision; nothing on CPU fp32."""
    if model.device.type == "cuda" and model.dtype != torch.float32:
        return torch.autocast("cuda", dtype=model.dtype)
    return contextlib.nullcontext()


def predict_noise(model, x: torch.Tensor, t, cond: Conditioning, guidance_scale: float, unet=None, return_cond: bool = False):
    """ε̂(x_t, t, c) with classifier-free guidance: ε_u + w (ε_c − ε_u), both branches in one call.

    `return_cond=True` returns (ε̂, ε_c): the conditional branch comes free with CFG.
    """
    unet = unet or model.unet
    cfg = guidance_scale > 1.0
    x_in = torch.cat([x, x]) if cfg else x
    embeds = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
    added = None
    if cond.pooled is not None:
        pooled = torch.cat([cond.neg_pooled, cond.pooled]) if cfg else cond.pooled
        time_ids = torch.cat([cond.time_ids, cond.time_ids]) if cfg else cond.time_ids
        added = {"text_embeds": pooled, "time_ids": time_ids}
    with autocast_for(model):
        out = unet(x_in.to(embeds.dtype) if not x_in.is_floating_point() else x_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
    if not cfg:
        return (out, out) if return_cond else out
    eps_u, eps_c = out.chunk(2)
    eps = eps_u + guidance_scale * (eps_c - eps_u)
    return (eps, eps_c) if return_cond else eps


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
    vae = model.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    img = vae.decode(z, return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def predict_x0(scheduler, eps: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, clipped like `ddim_step` when the scheduler clips."""
    a_t = alphas_at(scheduler, t)[0].to(x_t.device)
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0


def initial_noise(model, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    shape = (n, model.unet.config.in_channels, model.latent_size, model.latent_size)
    x = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    return x * model.scheduler.init_noise_sigma


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
) -> Trajectory:
    """Run the DDIM chain; returns latents x_T..x_0, log-probs, images.

    `keep_eps` stores ε̂ per step (extras['eps'], (N, T, C, h, w)); `keep_x0` stores the
    predicted x̂_0 per step (extras['x0_pred'], same shape) for intermediate rewards, from the CFG ε̂
    (`x0_guidance='cfg'`) or from the conditional branch alone (`'cond'`, free: CFG computes it anyway).
    `decode_chunk`: latents per VAE decode call for the final images (None = all at once).
    `keep_noise` stores the realised step noise z = (x_{t-1} − μ)/σ (extras['noise'], same shape):
    the behaviour policy's per-element log-density is −z²/2 − log σ − ½ log 2π.
    """
    sched = model.scheduler
    sched.set_timesteps(num_steps, device=model.device)
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
    images = decode_images(model, x, decode_chunk)
    traj = Trajectory(
        prompts=list(prompts),
        latents=torch.stack(xs, dim=1).cpu(),  # the sampling dtype (bf16 on GPU): exactly what each step consumed
        timesteps=steps.cpu(),
        log_probs=torch.stack(log_probs, dim=1).float().cpu(),
        cond=cond.to("cpu"),
        images=images,
        version=version,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=eta,
    )
    if keep_eps:
        traj.extras["eps"] = torch.stack(eps_all, dim=1).cpu()
    if keep_x0:
        traj.extras["x0_pred"] = torch.stack(x0_all, dim=1).cpu()
    if noise_all:
        traj.extras["noise"] = torch.stack(noise_all, dim=1).cpu()
    return traj
