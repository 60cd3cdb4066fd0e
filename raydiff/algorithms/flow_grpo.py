r"""Flow-GRPO: group-relative policy optimisation on the denoising MDP (Liu et al., arXiv 2505.05470; yifan123/flow_grpo).

Each prompt c is sampled k times (`group_size`, the engine's `Needs.samples_per_prompt`). Every
sampling step is Gaussian, π_θ(x_{t−1} | x_t, c) = N(μ_θ(x_t), σ_t²), the flow SDE of Flow-GRPO
(or DDIM with η > 0 on ε-prediction models). With the group-relative advantage of sample i

    A_i = (r_i − mean_group r) / (std_group r + ε)          (`global_std`: std over the epoch's batch)

and per step t the decoupled clipped ratio of `algorithms/common.py` (π_prox = π_old at staleness 0)

    ρ_t = exp(log π_θ − log π_prox),   w_t = min(exp(log π_prox − log π_old), c̄)
    L   = mean_t mean_i [ w_t · max(−A_i ρ_t, −A_i clip(ρ_t, 1 − ε_c, 1 + ε_c)) + β · KL_t,i ]
    KL_t,i = mean_CHW (μ_θ − μ_ref)² / (2 σ_t²)

log π is averaged over C·H·W (as the reference), A is clipped to ±`adv_clip_max`, and π_ref is the
base model: the same network with its LoRA switched off (`grpo_common.reference_weights`), no copy.
One optimiser step per minibatch accumulates the trained timesteps, as the reference does.

Asynchronous like DDPO: rollouts run up to `train.max_staleness` versions ahead; a stale batch is
re-scored once under the learner's weights (π_prox), as `attach_proximal_log_probs` does.
Deviations from yifan123/flow_grpo are listed in docs/algorithms/flow_grpo.md.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from raydiff.algorithms.base import Algorithm, Needs
from raydiff.algorithms.common import (PROX_KEY, AsyncAlgorithmConfig, StepAverager, attach_proximal_log_probs,
                                      decoupled_ppo_loss, trained_steps)
from raydiff.algorithms.grpo_common import group_advantages, reference_weights, require_groups, step_mean_kl
from raydiff.types import Trajectory


class Config(AsyncAlgorithmConfig):
    name: Literal["flow_grpo"] = Field("flow_grpo", description="Algorithm name.")
    group_size: int = Field(24, ge=2, description="Images sampled per prompt (k); advantages are relative to the group (flow_grpo: 24).")
    clip_range: float = Field(1e-4, gt=0, description="PPO clip ε on the per-step ratio (flow_grpo: 1e-4; 1e-5 for its fast/no-CFG configs).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to ±this (flow_grpo: 5).")
    std_eps: float = Field(1e-4, gt=0, description="ε added to the reward std in the advantage's denominator (a group whose rewards are all equal gets A = 0).")
    global_std: bool = Field(True, description="Divide by the std over the whole epoch's batch instead of the group's (flow_grpo's sample.global_std; True in its SD3.5 configs).")
    kl_beta: float = Field(0.04, ge=0, description="Weight β of the KL to the reference (base) policy on the step means (flow_grpo GenEval/OCR: 0.04, PickScore: 0.01; 0 skips the reference forward).")
    cfg: bool = Field(True, description="Train through classifier-free guidance; false = CFG-free (rollouts must sample with sampling.guidance_scale=1, one forward per step).")

    def validate_sampling(self, sampling) -> None:
        super().validate_sampling(sampling)
        if not self.cfg and sampling.guidance_scale > 1:
            raise ValueError(f"algorithm.cfg=false trains without classifier-free guidance, but sampling.guidance_scale="
                             f"{sampling.guidance_scale} samples with it (the ratio would not start at 1): set sampling.guidance_scale=1")


class FlowGRPO(Algorithm):
    config_cls = Config

    @property
    def needs(self) -> Needs:
        return Needs(mode="async", samples_per_prompt=self.config.group_size)

    def trained_steps(self, num_steps: int) -> int:
        return trained_steps(num_steps, self.config.timestep_fraction)

    def micro_steps_per_update(self, minibatch: Trajectory) -> int:
        return self.trained_steps(len(sde_steps(minibatch)))

    def prepare(self, batch: Trajectory) -> Trajectory:
        """Driver side, once per epoch on the whole batch: group-relative advantages."""
        ids = require_groups(batch, self.config.group_size, self.config.name)
        adv = group_advantages(batch.rewards, ids, self.config.std_eps, self.config.global_std)
        batch.advantages = torch.as_tensor(adv, dtype=torch.float32)
        return batch

    def prepare_batch(self, policy, batch: Trajectory) -> Trajectory:
        return attach_proximal_log_probs(policy, batch)

    def train_step(self, policy, optimizer, batch: Trajectory, rng: torch.Generator) -> dict[str, float]:
        c = self.config
        stochastic = sde_steps(batch)  # the SDE window's steps (all of them without a window)
        steps = [stochastic[i] for i in torch.randperm(len(stochastic), generator=rng)[: self.trained_steps(len(stochastic))].tolist()]
        dev = policy.device
        adv = batch.advantages.clamp(-c.adv_clip_max, c.adv_clip_max).to(dev)
        weights = batch.weights.to(dev) if batch.weights is not None else None
        prox = batch.extras[PROX_KEY] if PROX_KEY in batch.extras else batch.log_probs
        avg = StepAverager(len(steps))
        for j in steps:
            out = policy.step(batch, j)[0]
            policy_loss, stats = decoupled_ppo_loss(out.log_prob, prox[:, j].to(dev), batch.log_probs[:, j].to(dev), adv,
                                                    c.clip_range, c.is_clip, weights, c.is_mode)
            loss = policy_loss
            if c.kl_beta > 0:
                kl = self.reference_kl(policy, batch, j, out)
                kl_loss = (kl * weights).mean() if weights is not None else kl.mean()
                loss = policy_loss + c.kl_beta * kl_loss
                stats["kl"] = kl_loss.item()
            optimizer.backward(loss)
            avg.add({"loss": loss.item(), "policy_loss": policy_loss.item(), **stats})
        return avg.result()

    @staticmethod
    def reference_kl(policy, batch: Trajectory, j: int, out) -> torch.Tensor:
        """(N,) KL of step j to the base policy: same transition scored with the LoRA off, no grad."""
        with torch.no_grad(), reference_weights(policy.model.denoiser):
            ref = policy.step(batch, j)[0]
        return step_mean_kl(out.mean, ref.mean, kl_noise_scale(policy, batch, j, out))


def sde_steps(batch: Trajectory) -> list[int]:
    """Transitions with a Gaussian step in some sample (`Policy.stochastic_steps`): what the ratio can train."""
    from raydiff.sampling.policy import Policy

    steps = Policy.stochastic_steps(None, batch)  # reads only the batch (noise levels / η)
    if not steps:
        raise ValueError("no stochastic step in the batch: flow_grpo needs sampling.noise_level > 0 (flow models) or sampling.eta > 0 (DDIM)")
    return steps


def kl_noise_scale(policy, batch: Trajectory, j: int, out) -> torch.Tensor:
    """σ_t of the KL: the flow SDE's std_t = std/√(−dt) (flow_grpo's `std_dev_t`), else the step's own std."""
    sched = policy.model.scheduler
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is None or not hasattr(sched, "index_for_timestep"):
        return out.std
    policy._schedule(batch.num_steps)
    dt = float(sched.sigmas[j] - sched.sigmas[j + 1])
    return out.std / np.sqrt(dt)


ALGORITHM = FlowGRPO
