r"""DDPO: PPO on the denoising MDP (Black et al., arXiv 2305.13301; kvablack/ddpo-pytorch).

Each DDIM step with η = 1 is a Gaussian policy π_θ(x_{t-1} | x_t, c). With the
trajectory's reward r(x_0, c) and per-prompt normalised advantage

    A = clip((r − μ_c) / (σ_c + 1e-6), −A_max, A_max)

(μ_c, σ_c over the last `stat_buffer_size` rewards of prompt c once it has
`stat_min_count` of them, the batch's statistics until then), the loss per step is

    L_t = max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = exp(log π_θ − log π_old),

averaged over the batch and accumulated over the trained timesteps into one
optimiser step per minibatch. log π is averaged over C·H·W (as the reference).

Stale batches (asynchronous mode, made by version v, trained at u > v) use the
decoupled objective of `algorithms/common.py`: the learner scores each batch once
under its weights at arrival (π_prox, no grad), then per step

    L_t = w · max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε)),
    ρ_t = exp(log π_θ − log π_prox),   w = min(exp(log π_prox − log π_old), c̄).

At staleness 0, π_prox = π_old (the stored log-probs), w = 1: exactly the loss above.
Stale samples (default `stale_objective=per_element`) use that loss per latent element d,

    L_t = mean_d w_d · max(−A ρ_d, −A clip(ρ_d, 1 − ε', 1 + ε')),   ε' = `stale_clip_range`,

with ρ_d, w_d the per-element density ratios (π_old,d from the rollout's stored step noise);
`per_sample` uses geometric-mean ratios (log-probs are means over C·H·W). c̄ = `is_clip`.
With `is_baseline`, stale batches use A − b_t, b_t = Σ w A / Σ w over the batch per step.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from raydiff.algorithms.base import Algorithm, Needs
from raydiff.algorithms.common import (ADV_KEY, NOISE_KEY, PROX_CURRENT_KEY, PROX_ELEM_KEY, PROX_KEY, AsyncAlgorithmConfig, StepAverager,
                                      attach_proximal_log_probs, behaviour_element_log_prob, centre_advantages,
                                      decoupled_ppo_loss, decoupled_ppo_terms, trained_steps)
from raydiff.types import Trajectory


class Config(AsyncAlgorithmConfig):
    step_kinds: ClassVar[tuple[str, ...]] = ("ddim",)  # DDIM policy steps with eta (sd, sdxl); flow models use flow_grpo
    name: Literal["ddpo"] = Field("ddpo", description="Algorithm name.")
    clip_range: float = Field(1e-4, gt=0, description="PPO clip ε on the per-step ratio (ddpo-pytorch: 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to ±this.")
    per_prompt_stat_tracking: bool = Field(True, description="Normalise rewards per prompt (else over the batch).")
    stat_buffer_size: int = Field(16, ge=1, description="Rewards kept per prompt for its mean/std.")
    stat_min_count: int = Field(16, ge=1, description="Rewards a prompt needs before its own statistics are used.")
    stale_objective: Literal["per_element", "per_sample"] = Field("per_element", description="Decoupled PPO for stale samples: per latent element (ratio, weight and clip per element, then the mean; needs the rollout's step noise) or per sample (geometric-mean ratio and weight).")
    stale_clip_range: float = Field(0.2, gt=0, description="PPO clip ε on the per-element ratios of stale samples (stale_objective=per_element); per-element ratios move far more than geometric means.")
    is_baseline: bool = Field(False, description="For stale batches, centre the advantages per step under the importance weights (Σ w·A' = 0 over the batch, all ranks).")
    timesteps_per_forward: int = Field(1, ge=1, description="Trained denoising steps of a minibatch scored in one learner forward/backward (k·N rows): fewer, larger calls, k× the activation memory; same gradient.")


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
    """On-policy clipped PPO surrogate (the decoupled loss with π_prox = π_old, w = 1); inputs (N,)."""
    return decoupled_ppo_loss(log_prob, old_log_prob, old_log_prob, advantages, clip_range, float("inf"), weights)


class DDPO(Algorithm):
    config_cls = Config

    def __init__(self, config: Config, sampling, reward=None):
        super().__init__(config, sampling, reward)
        self.stats = PerPromptStats(config.stat_buffer_size, config.stat_min_count)

    def trained_steps(self, num_steps: int) -> int:
        return trained_steps(num_steps, self.config.timestep_fraction)

    @property
    def needs(self) -> Needs:
        return Needs(mode="async", keep_noise=self.config.stale_objective == "per_element")

    def micro_steps_per_update(self, minibatch: Trajectory) -> int:
        """Backward calls per optimiser step: one per chunk of `timesteps_per_forward` trained steps."""
        return -(-self.trained_steps(minibatch.log_probs.shape[1]) // self.config.timesteps_per_forward)

    def prepare(self, batch: Trajectory) -> Trajectory:
        if self.config.per_prompt_stat_tracking:
            adv = self.stats.advantages(batch.prompts, batch.rewards)
        else:
            r = np.asarray(batch.rewards, np.float64)
            adv = (r - r.mean()) / (r.std() + 1e-6)
        batch.advantages = torch.as_tensor(adv, dtype=torch.float32)
        return batch

    def prepare_batch(self, policy, batch: Trajectory) -> Trajectory:
        self._scorer = None
        if self.config.stale_objective == "per_element" and batch.max_staleness > 0 and NOISE_KEY not in batch.extras:
            raise ValueError("a stale batch has no extras['noise']: algorithm.stale_objective=per_element needs rollouts "
                             "sampled with the step noise kept (Needs.keep_noise); or set algorithm.stale_objective=per_sample")
        for key in (PROX_KEY, PROX_ELEM_KEY, ADV_KEY, PROX_CURRENT_KEY):
            batch.extras.pop(key, None)
        if batch.max_staleness > 0 and self.config.num_inner_epochs == 1 and not self.config.is_baseline:
            # Deferred: until the first optimiser step on this batch π_prox is θ itself; `minibatches`
            # scores the samples of minibatches 2.. under θ before yielding the first one.
            batch.extras[PROX_CURRENT_KEY] = batch.sample_staleness() > 0
            self._scorer = policy
            return batch
        batch = attach_proximal_log_probs(policy, batch, per_element=self.config.stale_objective == "per_element")
        if self.config.is_baseline and batch.max_staleness > 0:  # same branch on every rank (batch-level max)
            adv = batch.advantages.clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
            batch.extras[ADV_KEY] = centre_advantages(batch, adv, self.config.is_clip, self.config.is_mode)
        return batch

    def minibatches(self, batch, rng: torch.Generator):
        """As the base class; a deferred stale batch's later minibatches get π_prox scored before the first step.

        The first minibatch is trained before any optimiser step on the batch, at θ = π_prox, so
        its π_prox is the detached log-prob of its own training forward (`PROX_CURRENT_KEY`): the
        same objective as scoring it in `prepare_batch`, without that forward pass.
        """
        scorer, self._scorer = getattr(self, "_scorer", None), None
        if not isinstance(batch, Trajectory) or PROX_CURRENT_KEY not in batch.extras:
            yield from super().minibatches(batch, rng)
            return
        pieces = max(1, -(-len(batch) // self.config.train_batch_size))
        parts = torch.tensor_split(torch.randperm(len(batch), generator=rng), pieces)  # as shuffled_pieces
        rest = None
        if pieces > 1:
            if scorer is None:
                raise RuntimeError("minibatches of a deferred stale batch need the policy given to prepare_batch")
            rest = batch.index(torch.cat(parts[1:]))
            del rest.extras[PROX_CURRENT_KEY]
            rest = attach_proximal_log_probs(scorer, rest, per_element=self.config.stale_objective == "per_element")
        yield batch.index(parts[0])
        if rest is not None:
            ends = torch.tensor([len(p) for p in parts[1:]]).cumsum(0).tolist()
            for a, b in zip([0] + ends[:-1], ends):
                yield rest.index(torch.arange(a, b))

    def train_step(self, policy, optimizer, batch: Trajectory, rng: torch.Generator) -> dict[str, float]:
        T = batch.log_probs.shape[1]
        steps = torch.randperm(T, generator=rng)[: self.trained_steps(T)].tolist()
        dev = policy.device
        adv = batch.advantages.clamp(-self.config.adv_clip_max, self.config.adv_clip_max).to(dev)
        behaviour = batch.log_probs.to(dev)  # moved once per minibatch, not per step
        weights = batch.weights.to(dev) if batch.weights is not None else None
        current = batch.extras.get(PROX_CURRENT_KEY)  # (N,) stale mask: π_prox = θ now (deferred, no step yet)
        prox = batch.extras[PROX_KEY] if PROX_KEY in batch.extras else batch.log_probs  # no prepare_batch: on-policy
        avg = StepAverager(len(steps))
        prox = prox.to(dev)
        centred = batch.extras.get(ADV_KEY)  # (N, T): stale batch with the importance-weighted baseline
        centred = centred.to(dev) if centred is not None else None
        per_element = PROX_ELEM_KEY in batch.extras or (current is not None and self.config.stale_objective == "per_element")
        k = self.config.timesteps_per_forward
        chunks = [steps[i:i + k] for i in range(0, len(steps), k)]
        for chunk in chunks:
            losses = []
            for j, out in zip(chunk, policy.steps(batch, chunk) if len(chunk) > 1 else [None]):  # None: score j alone
                adv_j = centred[:, j] if centred is not None else adv
                if per_element:
                    loss, stats = self._per_element_loss(policy, batch, j, adv_j, weights, current, out)
                else:
                    log_prob = out.log_prob if out is not None else policy.log_prob(batch, j)
                    prox_j = prox[:, j]
                    if current is not None:
                        prox_j = torch.where(current.to(dev), log_prob.detach().float(), prox_j.float())
                    loss, stats = decoupled_ppo_loss(log_prob, prox_j, behaviour[:, j], adv_j,
                                                     self.config.clip_range, self.config.is_clip, weights, self.config.is_mode)
                if centred is not None:
                    stats["is_baseline"] = (adv - adv_j).mean()
                avg.add({"loss": loss.detach(), **stats})
                losses.append(loss)
            # The stepper divides by len(chunks) backward calls; the update stays Σ_j L_j / len(steps).
            optimizer.backward(losses[0] if len(chunks) == len(steps) else torch.stack(losses).sum() * (len(chunks) / len(steps)))
        return avg.result()  # the one host sync of this minibatch

    def _per_element_loss(self, policy, batch: Trajectory, j: int, adv, weights, current=None, out=None):
        """Step j of a stale batch: fresh samples per sample (stored log-probs), stale ones per element.

        Stale sample i: mean over elements d of w_d · max(−A ρ_d, −A clip(ρ_d, 1 ± ε')), with
        ρ_d = π_θ,d / π_prox,d, w_d = min(π_prox,d / π_b,d, c̄), ε' = `stale_clip_range`. Statistics
        are over the stale samples' elements when the minibatch has any. `current` (the first minibatch
        of a deferred stale batch): π_prox is θ itself, so its densities are this forward's, detached.
        `out`: step j's StepOutput when scored already (`Policy.steps`).
        """
        dev = policy.device
        lp_d, std = policy.element_log_prob(batch, j, out) if out is not None else policy.element_log_prob(batch, j)
        n = lp_d.shape[0]
        lp_d = lp_d.reshape(n, -1)
        log_prob = lp_d.mean(dim=1)
        idx = torch.nonzero(batch.sample_staleness() > 0).flatten()
        if current is not None:
            prox = torch.where(current.to(dev), log_prob.detach().float(), batch.log_probs[:, j].to(dev).float())
            prox_elem = lp_d.detach().float()[idx.to(dev)]
        else:
            prox = batch.extras[PROX_KEY][:, j].to(dev)
            prox_elem = batch.extras[PROX_ELEM_KEY][idx, j].reshape(len(idx), -1).to(dev) if len(idx) else None
        per_sample, stats = decoupled_ppo_terms(log_prob, prox,
                                                batch.log_probs[:, j].to(dev), adv, self.config.clip_range, self.config.is_clip,
                                                self.config.is_mode)
        if len(idx):
            idx_d = idx.to(dev)
            prox_d = prox_elem
            beh_d = behaviour_element_log_prob(batch.extras[NOISE_KEY][idx, j].reshape(len(idx), -1).to(dev), std)
            elem, stats = decoupled_ppo_terms(lp_d[idx_d], prox_d, beh_d, adv[idx_d, None], self.config.stale_clip_range,
                                              self.config.is_clip, self.config.is_mode)
            per_sample = per_sample.index_put((idx_d,), elem.mean(dim=1))
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean(), stats

    def state_dict(self) -> dict:
        return {"per_prompt_stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["per_prompt_stats"])


ALGORITHM = DDPO
