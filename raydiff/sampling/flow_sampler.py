"""Sample rectified-flow trajectories (SD3, FLUX) with Flow-GRPO per-step log-probs.

The chain runs σ = 1 → 0 over the family's `set_timesteps` schedule; step i is the SDE
step of sampling/steps/flow_sde.py with noise level a inside the SDE window and the
deterministic Euler step (a = 0, log-prob NaN) outside it (Flow-GRPO-Fast / MixGRPO).
Initial noise and step noise come from one generator, initial noise first, as
diffusers' pipelines draw it; with a = 0 everywhere the images equal the plain
`StableDiffusion3Pipeline` / `FluxPipeline` output for the same seed. Latents are stored
as the next step consumed them (rounded to the sampling dtype), so the learner re-scores
exactly what was sampled (DESIGN §8).
"""

from __future__ import annotations

from typing import Optional

import torch

from raydiff.sampling.sampler import collect_trajectory, initial_noise, predict_noise
from raydiff.sampling.steps.flow_sde import flow_sde_step
from raydiff.types import Conditioning, Trajectory


def window_levels(num_steps: int, noise_level: float, window: Optional[tuple[int, int]]) -> list[float]:
    """Per-step noise level: a inside [start, end) (None = every step), 0 elsewhere."""
    start, end = (0, num_steps) if window is None else window
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"SDE window {window} must satisfy 0 <= start < end <= num_steps={num_steps} "
                         "(sampling.sde_window_size / sde_window_max_start)")
    return [noise_level if start <= i < end else 0.0 for i in range(num_steps)]


def draw_window(num_steps: int, size: int, max_start: int, generator: torch.Generator) -> Optional[tuple[int, int]]:
    """The SDE window for one batch: `size` steps from a start drawn uniformly in [0, max_start]; None = all steps."""
    if size <= 0:
        return None
    if size + max_start > num_steps:
        raise ValueError(f"sampling.sde_window_size={size} + sde_window_max_start={max_start} exceeds sampling.num_steps={num_steps}")
    start = int(torch.randint(0, max_start + 1, (1,), generator=generator).item())
    return start, start + size


@torch.no_grad()
def sample_flow(
    model,
    cond: Conditioning,
    prompts: list[str],
    num_steps: int,
    guidance_scale: float,
    noise_level: float,
    sde_window: Optional[tuple[int, int]] = None,
    generator: Optional[torch.Generator] = None,
    version: int = 0,
    keep_x0: bool = False,
    keep_noise: bool = False,
    latents: Optional[torch.Tensor] = None,
    progress: bool = False,
    decode_chunk: Optional[int] = None,
) -> Trajectory:
    """Run the flow chain; returns latents x_1..x_0 (N, T+1, C, h, w), log-probs (N, T), images.

    extras['noise_level'] (N, T): the a of each step (0 outside the window); `keep_x0` stores
    x̂_0 = x − σ·v̂ per step (extras['x0_pred']); `keep_noise` the realised z = (x' − μ)/std on
    stochastic steps (zeros elsewhere, extras['noise']).
    """
    family, sched = model.family, model.scheduler
    family.set_timesteps(model, num_steps)
    x = initial_noise(model, len(prompts), generator) if latents is None else latents
    levels = window_levels(num_steps, noise_level, sde_window)
    xs, log_probs, x0_all, noise_all = [x], [], [], []
    steps = sched.timesteps
    it = range(len(steps))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        v = predict_noise(model, x, steps[i], cond, guidance_scale)
        out = flow_sde_step(sched, v, i, x, levels[i], generator=generator)
        x_prev = x
        x = out.prev_sample.to(model.dtype)
        xs.append(x)
        log_probs.append(out.log_prob)
        if keep_x0:
            x0_all.append(out.pred_original_sample.float())
        if keep_noise:
            z = (x.float() - out.mean) / out.std if levels[i] > 0 else torch.zeros_like(x_prev, dtype=torch.float32)
            noise_all.append(z)
    traj = collect_trajectory(model, prompts, xs, steps, log_probs, cond, decode_chunk, version, guidance_scale, noise_level)
    traj.extras["noise_level"] = torch.tensor(levels, dtype=torch.float32).expand(len(prompts), -1).clone()
    if keep_x0:
        traj.extras["x0_pred"] = torch.stack(x0_all, dim=1).cpu()
    if keep_noise:
        traj.extras["noise"] = torch.stack(noise_all, dim=1).cpu()
    return traj
