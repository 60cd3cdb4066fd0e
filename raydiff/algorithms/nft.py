r"""DiffusionNFT: online RL on the forward process (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT).

No trajectories and no log-probs: the learner keeps only each rollout's clean sample x_0, its
prompt c and its group-relative advantage A (as Flow-GRPO, `grpo_common.group_advantages`).
Per sample and trained timestep t (a random subset of the sampling schedule, per sample):

    r      = clamp(clamp(A, ±M)/M/2 + 1/2, 0, 1)                     (M = `adv_clip_max`: optimality probability)
    x_t    = forward noising of x_0 with fresh ε                      (flow: (1−t)x_0 + tε; DDPM: √ᾱ x_0 + √(1−ᾱ) ε)
    v⁺     = β v_θ + (1 − β) v_old,      v⁻ = (1 + β) v_old − β v_θ   (implicit positive / negative policies)
    x̂_0^±  = x_0 predicted from v^± at x_t                            (flow: x_t − t v)
    w^±    = sg(mean_CHW |x̂_0^± − x_0|), clipped ≥ 1e-5               (adaptive weight)
    L      = M · mean_i [ r · mean_CHW(x̂_0⁺ − x_0)²/w⁺ + (1 − r) · mean_CHW(x̂_0⁻ − x_0)²/w⁻ ] / β
           + β_KL · mean_i mean_CHW (v_θ − v_ref)²

The model is CFG-free (conditional branch only). v_old is the "old" policy, a second copy of the
LoRA weights updated after every learner epoch: θ_old ← η θ_old + (1 − η) θ with
η = min(uprate · (step − flat), uphold) (0 before `flat` optimiser steps), the reference's
`return_decay`. π_ref = the base weights with the LoRA off. x̂_0 is linear in the model output
for both parameterisations, so x̂_0^± = β x̂_0(v_θ) + (1−β) x̂_0(v_old) etc. (ε-prediction SD
models train the same objective on ε). Deviations: docs/algorithms/nft.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from raydiff.algorithms.base import Algorithm, Needs, shuffled_pieces
from raydiff.algorithms.common import StepAverager, trained_steps
from raydiff.algorithms.grpo_common import group_advantages, reference_weights, require_groups
from raydiff.config_base import Section
from raydiff.types import Trajectory


class Config(Section):
    name: Literal["nft"] = Field("nft", description="Algorithm name.")
    group_size: int = Field(24, ge=2, description="Images sampled per prompt (k); advantages are relative to the group (DiffusionNFT: 24).")
    train_batch_size: int = Field(8, ge=1, description="Samples per minibatch per learner worker (one optimiser step each).")
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each epoch's samples (DiffusionNFT: 1).")
    timestep_fraction: float = Field(0.99, gt=0, le=1, description="Fraction of the sampling schedule's T timesteps trained per sample (int(T·fraction), a random subset per sample; DiffusionNFT: 0.99).")
    beta: float = Field(1.0, gt=0, description="β of the implicit policies v± (DiffusionNFT: 1.0; 0.1 for OCR).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to ±M before r = A/M/2 + 1/2; the loss is scaled by M (DiffusionNFT: 5).")
    std_eps: float = Field(1e-4, gt=0, description="ε added to the reward std in the advantage's denominator.")
    global_std: bool = Field(True, description="Divide by the std over the whole epoch's batch instead of the group's (DiffusionNFT: true).")
    kl_beta: float = Field(1e-4, ge=0, description="Weight of mean (v_θ − v_ref)² to the base model (DiffusionNFT train.beta: 1e-4; 0 skips the reference forward).")
    old_flat: int = Field(0, ge=0, description="Optimiser steps before the old policy starts to lag (θ_old = θ until then); DiffusionNFT decay_type 1: 0, 2: 75.")
    old_uprate: float = Field(0.001, ge=0, description="Growth of the old policy's decay η per optimiser step (decay_type 1: 0.001, 2: 0.0075).")
    old_uphold: float = Field(0.5, ge=0, lt=1, description="Cap of the decay η (decay_type 1: 0.5, 2: 0.999).")

    def validate_sampling(self, sampling) -> None:
        """Any sampler works: NFT needs no log-probs (DiffusionNFT samples with a deterministic ODE solver)."""


def nft_loss(x0, x0_theta, x0_old, advantages, beta: float, adv_clip_max: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample DiffusionNFT policy loss (N,) from x̂_0 under v_θ (with grad) and v_old (constant); inputs (N, C, h, w)."""
    dims = tuple(range(1, x0.ndim))
    x0, x0_theta, x0_old = x0.float(), x0_theta.float(), x0_old.detach().float()
    a = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    r = (a / adv_clip_max / 2.0 + 0.5).clamp(0, 1)
    pos = beta * x0_theta + (1 - beta) * x0_old
    neg = (1 + beta) * x0_old - beta * x0_theta
    with torch.no_grad():
        w_pos = (pos.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        w_neg = (neg.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    pos_loss = ((pos - x0) ** 2 / w_pos).mean(dim=dims)
    neg_loss = ((neg - x0) ** 2 / w_neg).mean(dim=dims)
    per_sample = (r * pos_loss / beta + (1 - r) * neg_loss / beta) * adv_clip_max
    with torch.no_grad():
        stats = {"positive_loss": pos_loss.mean().item(), "negative_loss": neg_loss.mean().item(), "r_mean": r.mean().item(),
                 "old_deviate": ((x0_theta - x0_old) ** 2).mean().item()}
    return per_sample, stats


def old_decay(step: int, flat: int, uprate: float, uphold: float) -> float:
    """η of θ_old ← η θ_old + (1 − η) θ at optimiser step `step` (DiffusionNFT's `return_decay`)."""
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


class ForwardProcess:
    """Noising x_0 → x_t and x̂_0 from a model output, for flow-matching (v) and DDPM-family (ε) schedulers."""

    def __init__(self, scheduler):
        self.flow = not hasattr(scheduler, "alphas_cumprod")
        self.scheduler = scheduler

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor):
        shape = (-1,) + (1,) * (like.ndim - 1)
        if self.flow:
            s = (t.float() / self.scheduler.config.num_train_timesteps).to(like.device).view(shape)
            return 1 - s, s
        ab = self.scheduler.alphas_cumprod.to(like.device)[t.long().to(like.device)].float().view(shape)
        return ab.sqrt(), (1 - ab).sqrt()

    def noise(self, x0, eps, t):
        a, s = self._coeffs(t, x0)
        return a * x0.float() + s * eps.float()

    def x0_from(self, out, x_t, t):
        a, s = self._coeffs(t, x_t)
        if self.flow:  # x_t = (1−t)x_0 + tε, v = ε − x_0  ⇒  x_0 = x_t − t v
            return x_t.float() - s * out.float()
        return (x_t.float() - s * out.float()) / a


class NFT(Algorithm):
    config_cls = Config

    def __init__(self, config: Config, sampling, reward=None):
        super().__init__(config, sampling, reward)
        self._old: dict[str, torch.Tensor] | None = None  # learner side: θ_old by parameter name
        self._policy = None
        self._steps = 0

    @property
    def needs(self) -> Needs:
        return Needs(mode="async", samples_per_prompt=self.config.group_size, final_latents_only=True)

    def micro_steps_per_update(self, minibatch: Trajectory) -> int:
        return trained_steps(len(minibatch.timesteps), self.config.timestep_fraction)

    def prepare(self, batch: Trajectory) -> Trajectory:
        """Driver side, on metadata: group-relative advantages. Only x_0 travels to the learner (Needs.final_latents_only)."""
        ids = require_groups(batch, self.config.group_size, self.config.name)
        batch.advantages = torch.as_tensor(group_advantages(batch.rewards, ids, self.config.std_eps, self.config.global_std),
                                           dtype=torch.float32)
        batch.extras = {}  # the rollouts keep x_0 alone for the learner (Needs.final_latents_only)
        return batch

    def prepare_batch(self, policy, batch: Trajectory) -> Trajectory:
        """Learner side: θ_old starts as the current weights (first batch, and after a restart)."""
        self._policy = policy
        if self._old is None:
            self._old = {n: p.detach().float().clone() for n, p in self._trainable(policy)}
        return batch

    @staticmethod
    def _trainable(policy):
        return [(n, p) for n, p in policy.model.denoiser.named_parameters() if p.requires_grad]

    def minibatches(self, batch, rng: torch.Generator):
        yield from shuffled_pieces(batch, self.config.train_batch_size, self.config.num_inner_epochs, rng)
        self._update_old()  # after the epoch's last optimiser step, as the reference

    def _update_old(self) -> None:
        c = self.config
        eta = old_decay(self._steps, c.old_flat, c.old_uprate, c.old_uphold)
        with torch.no_grad():
            for n, p in self._trainable(self._policy):
                self._old[n].mul_(eta).add_(p.detach().float(), alpha=1 - eta)

    def _predict(self, policy, x_t, t, cond, state=None):
        """CFG-free model output at x_t; with `state` (θ_old by name) swapped into the trainable weights for the call."""
        from raydiff.sampling.sampler import predict_noise

        if state is None:
            return predict_noise(policy.model, x_t.to(policy.model.dtype), t, cond, 1.0)
        params = self._trainable(policy)
        current = [p.detach().clone() for _, p in params]
        try:
            for n, p in params:
                p.data.copy_(state[n])
            return predict_noise(policy.model, x_t.to(policy.model.dtype), t, cond, 1.0)
        finally:
            for (_, p), v in zip(params, current):
                p.data.copy_(v)

    def train_step(self, policy, optimizer, batch: Trajectory, rng: torch.Generator) -> dict[str, float]:
        c = self.config
        dev = policy.device
        fp = ForwardProcess(policy.model.scheduler)
        policy._schedule(batch.num_steps)
        n, T = len(batch), len(batch.timesteps)
        k = trained_steps(T, c.timestep_fraction)
        order = torch.stack([torch.randperm(T, generator=rng) for _ in range(n)])[:, :k]  # per-sample timesteps
        x0 = batch.latents[:, -1].to(dev).float()
        cond = batch.cond.to(dev)
        adv = batch.advantages.to(dev)
        weights = batch.weights.to(dev) if batch.weights is not None else None
        avg = StepAverager(k)
        for jj in range(k):
            t = batch.timesteps[order[:, jj]].to(dev)
            eps = torch.randn(x0.shape, generator=rng).to(dev)
            x_t = fp.noise(x0, eps, t)
            with torch.no_grad():
                out_old = self._predict(policy, x_t, t, cond, self._old)
            out = self._predict(policy, x_t, t, cond)
            per_sample, stats = nft_loss(x0, fp.x0_from(out, x_t, t), fp.x0_from(out_old, x_t, t), adv, c.beta, c.adv_clip_max)
            policy_loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
            loss = policy_loss
            if c.kl_beta > 0:
                with torch.no_grad(), reference_weights(policy.model.denoiser):
                    out_ref = self._predict(policy, x_t, t, cond)
                kl = ((out.float() - out_ref.float()) ** 2).mean(dim=tuple(range(1, out.ndim)))
                kl = (kl * weights).mean() if weights is not None else kl.mean()
                loss = policy_loss + c.kl_beta * kl
                stats["kl"] = kl.item()
            optimizer.backward(loss)
            avg.add({"loss": loss.item(), "policy_loss": policy_loss.item(), **stats})
        self._steps += 1
        out = avg.result()
        out["old_decay"] = old_decay(self._steps, c.old_flat, c.old_uprate, c.old_uphold)
        return out


ALGORITHM = NFT
