"""The learner's view of the model: recompute log p_θ(x_{t-1} | x_t, c) for stored transitions.

Uses the exact numerics of the sampler (same `set_timesteps`, same CFG call,
same float32 log-prob), so at the first inner step the PPO ratio is 1.
"""

from __future__ import annotations

import torch

from raydiff.sampling.ddim import StepOutput, ddim_step, gaussian_log_density
from raydiff.sampling.sampler import predict_noise
from raydiff.types import Trajectory


class Policy:
    def __init__(self, model):
        self.model = model
        self._num_steps = None
        self._moved = None  # (batch, its latents / cond / timesteps on the device, host timesteps)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _schedule(self, num_steps: int) -> None:
        if self._num_steps != num_steps:
            self.model.scheduler.set_timesteps(num_steps, device=self.device)
            self._num_steps = num_steps

    def on_device(self, batch: Trajectory):
        """(latents, cond, timesteps) of `batch` on the device and the host timesteps: one copy per batch, not per step.

        Per-step `.to(device)` of pageable CPU tensors and `int(t)` of a device tensor each block
        the host until the GPU catches up; the ᾱ lookup uses the host ints instead.
        """
        if self._moved is None or self._moved[0] is not batch:
            dev, dt = self.device, self.model.dtype
            self._moved = (batch, batch.latents.to(dev, dt), batch.cond.to(dev), batch.timesteps.to(dev),
                           [int(t) for t in batch.timesteps])
        return self._moved[1:]

    def step(self, batch: Trajectory, j: int) -> tuple[StepOutput, torch.Tensor]:
        """Score the stored transition j (x_t = latents[:, j] -> latents[:, j+1]); returns (step output, ε̂)."""
        self._schedule(batch.num_steps)
        m = self.model
        latents, cond, steps, steps_host = self.on_device(batch)
        x_t, x_prev = latents[:, j], latents[:, j + 1]
        eps = predict_noise(m, x_t, steps[j], cond, batch.guidance_scale)
        return ddim_step(m.scheduler, eps, steps_host[j], x_t, batch.eta, prev_sample=x_prev), eps

    def log_prob(self, batch: Trajectory, j: int) -> torch.Tensor:
        return self.step(batch, j)[0].log_prob

    def element_log_prob(self, batch: Trajectory, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element log-density of transition j (N, C, h, w), float32, and the step's σ (scalar)."""
        out = self.step(batch, j)[0]
        x_prev = self.on_device(batch)[0][:, j + 1]
        return gaussian_log_density(x_prev, out.mean, out.std), out.std.float()
