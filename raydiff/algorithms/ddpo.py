r"""DDPO: PPO on the denoising MDP (Black et al., arXiv 2305.13301; kvablack/ddpo-pytorch).

Each DDIM step with η = 1 is a Gaussian policy π_θ(x_{t-1} | x_t, c). With the
trajectory's reward r(x_0, c) and per-prompt normalised advantage

    A = clip((r − μ_c) / (σ_c + 1e-6), −A_max, A_max)

(μ_c, σ_c over the last `stat_buffer_size` rewards of prompt c once it has
`stat_min_count` of them, the batch's statistics until then), the loss per step is

    L_t = max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = exp(log π_θ − log π_old),

averaged over the batch and accumulated over the trained timesteps into one
optimiser step per minibatch. log π is averaged over C·H·W (as the reference).

Stale batches (made by version v, trained at u > v, asynchronous mode):
- `off_policy: reparam` (default) re-scores each step's sampling noise ε under the
  current weights, x' = sg(μ_θ(x_t)) + σ_t ε, so the loss is −A·exp(log π_θ(x') −
  sg(log π_θ(x'))): the on-policy score of the same noise. Re-scoring the stored
  x_{t-1} instead adds a term −(μ_θ − μ_v)/σ_t² that pulls the policy back to the
  old one, huge at late low-σ steps; with log-probs averaged over C·H·W no
  importance weight can undo it (the true density ratio is exp(C·H·W × mean)).
- `truncated_is`: current policy as proximal policy (decoupled PPO, Hilton et al.
  2021), weight w = min(π_u/π_v, c̄) per step, baseline re-centred under w.
- `ppo`: plain clipped ratio against the behaviour policy.
On the tiny CPU run at staleness 1–2 the last two did not learn (ppo drove the
reward down); see docs/algorithms/ddpo.md. Fresh batches (staleness 0) always
use the exact clipped objective above.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from raydiff.algorithms.base import Algorithm, Needs
from raydiff.config_base import Section
from raydiff.types import Trajectory


class AsyncAlgorithmConfig(Section):
    """Fields every rollout-based (async) algorithm shares with the learner loop."""

    train_batch_size: int = Field(8, ge=1, description="Trajectories per minibatch per learner worker (one optimiser step each).")
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each epoch's trajectories (ddpo-pytorch: 1).")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the T steps trained per minibatch (random subset).")


class Config(AsyncAlgorithmConfig):
    name: Literal["ddpo"] = Field("ddpo", description="Algorithm name.")
    clip_range: float = Field(1e-4, gt=0, description="PPO clip ε on the per-step ratio (ddpo-pytorch: 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to ±this.")
    per_prompt_stat_tracking: bool = Field(True, description="Normalise rewards per prompt (else over the batch).")
    stat_buffer_size: int = Field(16, ge=1, description="Rewards kept per prompt for its mean/std.")
    stat_min_count: int = Field(16, ge=1, description="Rewards a prompt needs before its own statistics are used.")
    off_policy: Literal["reparam", "truncated_is", "ppo"] = Field("reparam", description="Stale batches: re-score the sampling noise under current weights (reparam), truncated importance weights, or plain PPO ratios.")
    is_clip: float = Field(1.0, gt=0, description="Truncation c̄ of the per-step importance weight π_current/π_behaviour for stale batches.")


class PerPromptStats:
    """Running per-prompt reward statistics; prompts with too few rewards use the batch's."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, np.float64)
        out = np.empty_like(rewards)
        g_mean, g_std = rewards.mean(), rewards.std()
        prompts_arr = np.array(prompts, dtype=object)
        for p in set(prompts):
            mask = prompts_arr == p
            self.buffers[p].extend(rewards[mask].tolist())
            buf = np.asarray(self.buffers[p])
            mean, std = (buf.mean(), buf.std()) if len(buf) >= self.min_count else (g_mean, g_std)
            out[mask] = (rewards[mask] - mean) / (std + 1e-6)
        return out

    def state_dict(self) -> dict:
        return {"buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for p, vals in state["buffers"].items():
            self.buffers[p].extend(vals)


def ppo_clipped_loss(log_prob, old_log_prob, advantages, clip_range, weights=None):
    """Clipped PPO surrogate (to minimise) and its statistics; inputs (N,)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean().item(),
            "clipfrac": (torch.abs(ratio - 1.0) > clip_range).float().mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max_dev": (ratio - 1.0).abs().max().item(),
        }
    return loss, stats


class DDPO(Algorithm):
    config_cls = Config

    def __init__(self, config: Config, sampling, reward=None):
        super().__init__(config, sampling, reward)
        self.stats = PerPromptStats(config.stat_buffer_size, config.stat_min_count)

    def trained_steps(self, num_steps: int) -> int:
        return max(1, int(round(num_steps * self.config.timestep_fraction)))

    @property
    def needs(self) -> Needs:
        return Needs(mode="async", keep_noise=True)

    def micro_steps_per_update(self, minibatch: Trajectory) -> int:
        return self.trained_steps(minibatch.log_probs.shape[1])

    def prepare(self, batch: Trajectory) -> Trajectory:
        if self.config.per_prompt_stat_tracking:
            adv = self.stats.advantages(batch.prompts, batch.rewards)
        else:
            r = np.asarray(batch.rewards, np.float64)
            adv = (r - r.mean()) / (r.std() + 1e-6)
        batch.advantages = torch.as_tensor(adv, dtype=torch.float32)
        return batch

    def train_step(self, policy, optimizer, batch: Trajectory, rng: torch.Generator) -> dict[str, float]:
        T = batch.log_probs.shape[1]
        steps = torch.randperm(T, generator=rng)[: self.trained_steps(T)].tolist()
        adv = batch.advantages.clamp(-self.config.adv_clip_max, self.config.adv_clip_max).to(policy.device)
        weights = batch.weights.to(policy.device) if batch.weights is not None else None
        totals: dict[str, float] = defaultdict(float)
        mode = self.config.off_policy if batch.staleness > 0 else "on_policy"
        for j in steps:
            old = batch.log_probs[:, j].to(policy.device)
            if mode == "reparam":
                log_prob, stored = policy.log_prob_reparam(batch, j)
                loss, stats = ppo_clipped_loss(log_prob, log_prob.detach(), adv, self.config.clip_range, weights)
                stats["behaviour_approx_kl"] = 0.5 * ((stored - old) ** 2).mean().item()
            elif mode == "truncated_is":
                log_prob = policy.log_prob(batch, j)
                is_w = torch.exp(log_prob.detach() - old).clamp(max=self.config.is_clip)
                w = is_w if weights is None else is_w * weights
                # Baseline under the re-weighted batch keeps sum(w * A) = 0.
                adv_w = adv - (w * adv).sum() / w.sum().clamp_min(1e-8)
                loss, stats = ppo_clipped_loss(log_prob, log_prob.detach(), adv_w, self.config.clip_range, w)
                stats["is_weight_mean"] = is_w.mean().item()
                stats["behaviour_approx_kl"] = 0.5 * ((log_prob.detach() - old) ** 2).mean().item()
            else:  # fresh batch, or off_policy=ppo
                log_prob = policy.log_prob(batch, j)
                loss, stats = ppo_clipped_loss(log_prob, old, adv, self.config.clip_range, weights)
            optimizer.backward(loss)
            totals["loss"] += loss.item() / len(steps)
            for k, v in stats.items():
                totals[k] = max(totals[k], v) if k == "ratio_max_dev" else totals[k] + v / len(steps)
        return dict(totals)

    def state_dict(self) -> dict:
        return {"per_prompt_stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["per_prompt_stats"])


ALGORITHM = DDPO
