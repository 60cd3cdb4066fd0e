"""The learner's view of the model: recompute log p_θ(x_{t-1} | x_t, c) for stored transitions.

Uses the exact numerics of the sampler (same `set_timesteps`, same CFG call,
same float32 log-prob), so at the first inner step the PPO ratio is 1.
"""

from __future__ import annotations

import torch

from raydiff.sampling.steps.ddim import StepOutput, ddim_step, gaussian_log_density
from raydiff.sampling.sampler import predict_noise
from raydiff.types import Trajectory


class Policy:
    def __init__(self, model):
        self.model = model
        self._num_steps = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _schedule(self, num_steps: int) -> None:
        if self._num_steps != num_steps:
            self.model.scheduler.set_timesteps(num_steps, device=self.device)
            self._num_steps = num_steps

    def step(self, batch: Trajectory, j: int) -> tuple[StepOutput, torch.Tensor]:
        """Score the stored transition j (x_t = latents[:, j] -> latents[:, j+1]); returns (step output, ε̂)."""
        self._schedule(batch.num_steps)
        m = self.model
        t = batch.timesteps[j].to(self.device)
        x_t = batch.latents[:, j].to(self.device, m.dtype)
        x_prev = batch.latents[:, j + 1].to(self.device, m.dtype)
        cond = batch.cond.to(self.device)
        eps = predict_noise(m, x_t, t, cond, batch.guidance_scale)
        return ddim_step(m.scheduler, eps, t, x_t, batch.eta, prev_sample=x_prev), eps

    def log_prob(self, batch: Trajectory, j: int) -> torch.Tensor:
        return self.step(batch, j)[0].log_prob

    def element_log_prob(self, batch: Trajectory, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element log-density of transition j (N, C, h, w), float32, and the step's σ (scalar)."""
        out = self.step(batch, j)[0]
        x_prev = batch.latents[:, j + 1].to(self.device, self.model.dtype)
        return gaussian_log_density(x_prev, out.mean, out.std), out.std.float()
