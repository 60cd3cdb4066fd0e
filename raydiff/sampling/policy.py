"""The learner's view of the model: recompute log p_θ(x_{t-1} | x_t, c) for stored transitions.

Uses the exact numerics of the sampler (the family's `set_timesteps` and `predict`, the
same step maths — DDIM or flow SDE by the family's step kind — and float32 log-probs),
so at the first inner step the PPO ratio is 1. Algorithms reach the network only
through this class and `policy.model.family`.
"""

from __future__ import annotations

import torch

from raydiff.sampling.sampler import predict_noise
from raydiff.sampling.steps.ddim import StepOutput, ddim_step, gaussian_log_density
from raydiff.sampling.steps.flow_sde import flow_sde_step
from raydiff.types import Conditioning, Trajectory


class Policy:
    def __init__(self, model):
        self.model = model
        self._num_steps = None
        self._moved = None  # (batch, its latents / cond / timesteps on the device, host timesteps)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def step_kind(self) -> str:
        """'ddim' or 'flow': which step maths the model's family samples with."""
        return self.model.family.step_kind

    def _schedule(self, num_steps: int) -> None:
        if self._num_steps != num_steps:
            self.model.family.set_timesteps(self.model, num_steps)
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

    def noise_levels(self, batch: Trajectory, j: int) -> torch.Tensor:
        """(N,) step noise of transition j: flow a per sample (0 outside the SDE window), else DDIM's η."""
        if "noise_level" in batch.extras:
            return batch.extras["noise_level"][:, j].float()
        return torch.full((len(batch),), float(batch.eta))

    def stochastic_steps(self, batch: Trajectory) -> list[int]:
        """Transitions with a Gaussian step (finite log-prob) in some sample: the ones a policy gradient trains on."""
        if "noise_level" not in batch.extras:
            return list(range(batch.num_steps)) if batch.eta > 0 else []
        return [j for j in range(batch.num_steps) if bool((batch.extras["noise_level"][:, j] > 0).any())]

    def step(self, batch: Trajectory, j: int) -> tuple[StepOutput, torch.Tensor]:
        """Score the stored transition j (x_t = latents[:, j] -> latents[:, j+1]); returns (step output, network output)."""
        self._schedule(batch.num_steps)
        m = self.model
        latents, cond, steps, steps_host = self.on_device(batch)
        x_t, x_prev = latents[:, j], latents[:, j + 1]
        out = predict_noise(m, x_t, steps[j], cond, batch.guidance_scale)
        if self.step_kind == "flow":
            return flow_sde_step(m.scheduler, out, j, x_t, self.noise_levels(batch, j).to(self.device), prev_sample=x_prev), out
        return ddim_step(m.scheduler, out, steps_host[j], x_t, batch.eta, prev_sample=x_prev), out

    def steps(self, batch: Trajectory, js: list[int]) -> list[StepOutput]:
        """Score the stored transitions `js` with one network call (their k·N rows batched), one StepOutput each.

        Fewer, larger forward/backward passes: on CPU and on a GPU with memory to spare the per-call
        overhead and small GEMMs dominate a small model. The step maths per transition are `step`'s;
        the network sees each row's own timestep, so only the batching (float summation order) differs.
        Flow steps are scored one call each.
        """
        if len(js) == 1 or self.step_kind != "ddim":
            return [self.step(batch, j)[0] for j in js]
        self._schedule(batch.num_steps)
        latents, cond, timesteps, timesteps_host = self.on_device(batch)
        n = latents.shape[0]
        idx = torch.tensor(js, device=latents.device)
        x_t = latents[:, idx].transpose(0, 1).flatten(0, 1)  # (k·N, C, h, w), step-major
        eps = predict_noise(self.model, x_t, timesteps[idx].repeat_interleave(n), Conditioning.cat([cond] * len(js)),
                            batch.guidance_scale)
        return [ddim_step(self.model.scheduler, e, timesteps_host[j], latents[:, j], batch.eta, prev_sample=latents[:, j + 1])
                for j, e in zip(js, eps.split(n))]

    def log_prob(self, batch: Trajectory, j: int) -> torch.Tensor:
        return self.step(batch, j)[0].log_prob

    def element_log_prob(self, batch: Trajectory, j: int, out: StepOutput | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element log-density of transition j (N, C, h, w), float32, and the step's σ (scalar, or (N,1,1,1) for flow).

        `out`: transition j's StepOutput when already computed (`steps`)."""
        out = out if out is not None else self.step(batch, j)[0]
        x_prev = self.on_device(batch)[0][:, j + 1]
        return gaussian_log_density(x_prev, out.mean, out.std), out.std.float()
