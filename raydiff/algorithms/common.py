r"""What rollout-based algorithms share: their config fields and the decoupled PPO objective.

Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization";
AReaL's decoupled objective). A batch sampled by the behaviour policy π_b (policy
version v) reaches the learner at version u ≥ v. Once, before the first optimiser
step on it and without gradients, the learner scores every stored transition under
its weights at that moment: π_prox. Per sample i and step t:

    ρ = exp(log π_θ − log π_prox)                  (PPO ratio against the proximal policy)
    w = min(exp(log π_prox − log π_b), c̄)          (truncated importance weight, constant)
    L = w · max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))

At staleness 0 (u = v) the proximal policy *is* the behaviour policy: the stored
log-probs are used (no re-score), w = 1 and L is exactly the on-policy clipped PPO
loss of DDPO. Staleness is per sample (a batch may mix versions).

Per-element form (DDPO's default for stale samples, `stale_objective=per_element`; AReaL's
per-token form). ρ_d, w_d as above from the per-element Gaussian log-densities of element d of the
step's latent, L = mean_d w_d · max(−A ρ_d, −A clip(ρ_d, 1 ± ε')). log π_b,d = −z_d²/2 − log σ − ½ log 2π
from the rollout's stored step noise z (`NOISE_KEY`); `attach_proximal_log_probs(per_element=True)`
keeps log π_prox,d. At a stale sample ∇ log π_θ,d = (σz_d − δ_d)/σ² ∇μ_d with δ = μ_prox − μ_b, and
E_{z_d}[w_d (σz_d − δ_d)] = 0 per element: the pull towards π_b cancels in expectation per
coordinate (exactly within a step; across steps, as per token, it is an approximation).

Per-sample form (`per_sample`, and DAG-KL): log-probs are means over C·H·W (as ddpo-pytorch),
so ρ and w are per-element *geometric means* of the true density ratios (the true ratio is
exp(C·H·W × mean)). Such a weight cannot cancel the −δ/σ² pull, which is per element, correlates
with A through x_t, and pulls the policy back to π_b (docs/algorithms/ddpo.md measures it).
c̄ (`is_clip`, default 2.0) bounds the weight in both forms.

The gradient of L at θ = prox (the first minibatch of a stale batch) is
w · (−A) · ∇ log π_θ: the importance-weighted score of the *current* policy, an
unbiased estimate of its policy gradient when c̄ does not truncate (tests/test_decoupled_ppo.py
checks it on Gaussian policies in closed form: 1-D per sample, 16-D per element).

Importance-weighted baseline (DDPO's `is_baseline`, stale batches only). At a stale sample
∇ log π_θ(x_{t−1}|x_t) = (σz − δ)/σ² ∇μ with δ = μ_prox − μ_b, the policy's move since
sampling; the −δ/σ² part pulls towards π_b unless Σ_i w_i A_i = 0, and w correlates with A.
So per step t the advantages are centred under the weights, A' = A − Σ w A / Σ w (sums
over the whole batch, all-reduced over learner ranks): a constant baseline, so an exact-weight
estimator stays consistent (tested), and the common pull cancels. It does not cancel the
per-sample part of δ (δ_i and ∇μ_i vary with x_t). Logged as `train/is_baseline`. Off by
default: on the tiny async config it did not change the reward (docs/algorithms/ddpo.md).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from raydiff.config_base import Section
from raydiff.types import Trajectory

PROX_KEY = "prox_log_probs"  # extras key: (N, T) log π_prox, written by `attach_proximal_log_probs`
PROX_ELEM_KEY = "prox_element_log_probs"  # extras key: (N, T, C, h, w) per-element log π_prox (per_element=True)
NOISE_KEY = "noise"  # rollout extras: (N, T, C, h, w) realised step noise z (Needs.keep_noise)
PROX_CURRENT_KEY = "prox_is_current"  # minibatch extras flag: trained before any step on its batch, so π_prox = θ
ADV_KEY = "centred_advantages"  # extras key: (N, T) advantages centred under w, written by `centre_advantages`


class AsyncAlgorithmConfig(Section):
    """Fields every rollout-based (async) algorithm shares with the learner loop."""

    train_batch_size: int = Field(8, ge=1, description="Trajectories per minibatch per learner worker (one optimiser step each).")
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each epoch's trajectories (ddpo-pytorch: 1).")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the T steps trained per minibatch (random subset, int(T·fraction) of them as the references).")
    is_clip: float = Field(2.0, ge=1, description="Truncation c̄ of the per-step importance weight min(π_prox/π_behaviour, c̄) for stale samples (geometric-mean ratios).")
    is_mode: Literal["truncate", "mask"] = Field("truncate", description="Stale importance weights: truncate (min(w, c̄)) or mask (w = 0 where w is outside [1/c̄, c̄]: a sample or element the current policy would hardly draw is left out).")

    def validate_sampling(self, sampling) -> None:
        """Rollout log-probs are Gaussian densities: they need η > 0 (η = 0 makes σ_t = 0, log-prob undefined)."""
        if sampling.eta <= 0:
            raise ValueError(f"sampling.eta={sampling.eta}: algorithm {self.name!r} trains on per-step log-probs, which need "
                             "a stochastic DDIM step; set sampling.eta > 0 (1.0 as the references)")


def trained_steps(num_steps: int, fraction: float) -> int:
    """Timesteps trained per minibatch: int(T · fraction) as ddpo-pytorch and DAG, at least 1."""
    return max(1, int(num_steps * fraction))


def attach_proximal_log_probs(policy, batch: Trajectory, per_element: bool = False) -> Trajectory:
    """Store log π_prox (N, T) in `batch.extras[PROX_KEY]`: current weights, no grad, once per batch.

    Samples with staleness 0 keep their stored behaviour log-probs (π_prox = π_b, no re-score).
    The re-score runs whenever the *whole* batch has a stale sample (`batch.max_staleness`,
    identical on every learner rank), over every sample of this shard, one forward per step:
    all ranks then run the same forwards, as ZeRO-3's parameter all-gathers need.

    `per_element=True` also keeps the per-element densities (N, T, C, h, w) in
    `extras[PROX_ELEM_KEY]` (fp32, on the CPU: one latent-sized tensor; every sample's
    re-score, fresh ones unused) for the per-element objective of stale samples.
    """
    stored = batch.log_probs.float()
    batch.extras.pop(PROX_ELEM_KEY, None)
    if batch.max_staleness == 0:
        batch.extras[PROX_KEY] = stored.clone()
        return batch
    stale = batch.sample_staleness() > 0  # (N,)
    prox, elems = stored.clone(), []
    with torch.no_grad():
        for j in range(stored.shape[1]):
            if per_element:
                lp_d = policy.element_log_prob(batch, j)[0].float().cpu()
                elems.append(lp_d)
                rescored = lp_d.mean(dim=tuple(range(1, lp_d.ndim)))
            else:
                rescored = policy.log_prob(batch, j).float().cpu()
            prox[:, j] = torch.where(stale, rescored, stored[:, j])
    batch.extras[PROX_KEY] = prox
    if per_element:
        batch.extras[PROX_ELEM_KEY] = torch.stack(elems, dim=1)
    return batch


def behaviour_element_log_prob(noise: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element log π_b = −z²/2 − log σ − ½ log 2π from the stored realised step noise z (a constant)."""
    z = noise.float()
    return -0.5 * z**2 - torch.log(std.float()) - 0.5 * math.log(2 * math.pi)


def importance_weights(prox_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, is_clip: float,
                       mode: str = "truncate") -> torch.Tensor:
    """w = min(exp(log π_prox − log π_b), c̄) elementwise, or with `mode="mask"` w where 1/c̄ ≤ w ≤ c̄ and 0
    elsewhere (masked importance sampling); constant: no gradient."""
    log_w = (prox_log_probs - behaviour_log_probs).detach()
    if mode == "mask":
        return torch.where(log_w.abs() <= math.log(is_clip), torch.exp(log_w), torch.zeros_like(log_w))
    return torch.exp(log_w).clamp(max=is_clip)


def centre_advantages(batch: Trajectory, advantages: torch.Tensor, is_clip: float, is_mode: str = "truncate") -> torch.Tensor:
    """(N, T) advantages centred per step under the weights: A' = A − Σ w A / Σ w, sums over the whole batch.

    The baseline b_t is one number per step for the whole (unsharded) batch: the sums are
    all-reduced over the learner ranks when torch.distributed runs (every rank calls this,
    as every rank re-scores). Padding (batch.weights = 0) does not count. Needs `PROX_KEY`.
    """
    w = importance_weights(batch.extras[PROX_KEY], batch.log_probs.float(), is_clip, is_mode)  # (N, T)
    mask = batch.weights.float() if batch.weights is not None else torch.ones(len(batch))
    wm = w * mask[:, None]
    adv = advantages.float()[:, None]
    sums = torch.stack([(wm * adv).sum(0), wm.sum(0)])  # (2, T)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    baseline = sums[0] / sums[1].clamp(min=1e-12)  # (T,)
    return adv - baseline[None, :]


def decoupled_ppo_loss(log_prob, prox_log_prob, behaviour_log_prob, advantages, clip_range: float, is_clip: float,
                       weights=None, is_mode: str = "truncate") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled clipped surrogate (to minimise) and its statistics; every input (N,).

    `weights` (N,) are extra per-sample weights (e.g. the staleness gate's damping, 0 for
    padding); the loss is the mean over N of weights · w · max(−Aρ, −A clip(ρ)).
    """
    per_sample, stats = decoupled_ppo_terms(log_prob, prox_log_prob, behaviour_log_prob, advantages, clip_range, is_clip, is_mode)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean(), stats


def decoupled_ppo_terms(log_prob, prox_log_prob, behaviour_log_prob, advantages, clip_range: float,
                        is_clip: float, is_mode: str = "truncate") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample w · max(−Aρ, −A clip(ρ, 1±ε)) (N,) and the step's ratio / weight statistics."""
    ratio = torch.exp(log_prob - prox_log_prob)
    log_w = (prox_log_prob - behaviour_log_prob).detach()
    is_w_raw = torch.exp(log_w)
    is_w = importance_weights(prox_log_prob, behaviour_log_prob, is_clip, is_mode)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = is_w * torch.maximum(unclipped, clipped)
    with torch.no_grad():  # 0-d tensors on the device: read back once per minibatch (StepAverager), no sync per step
        stats = {
            "approx_kl": 0.5 * ((log_prob - prox_log_prob) ** 2).mean(),
            "clipfrac": (torch.abs(ratio - 1.0) > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": (ratio - 1.0).abs().max(),
            "is_weight_mean": is_w.mean(),
            "is_weight_max_dev": (is_w - 1.0).abs().max(),
            "is_truncated_frac": ((is_w_raw > is_clip) | ((is_w_raw < 1.0 / is_clip) if is_mode == "mask" else False)).float().mean(),
            "behaviour_approx_kl": 0.5 * (log_w**2).mean(),
        }
    return per_sample, stats


class StepAverager:
    """Per-step statistics over the trained timesteps: means, except *_max_dev which keep the maximum.

    Values may be 0-d device tensors: they are combined on the device and copied to the host in
    one transfer by `result()` (once per minibatch), so the learner never syncs per step.
    """

    def __init__(self, n: int):
        self.n, self.totals = n, {}

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            old = self.totals.get(k)
            if k.endswith("max_dev"):
                self.totals[k] = v if old is None else torch.maximum(old, v)
            else:
                self.totals[k] = v / self.n if old is None else old + v / self.n

    def result(self) -> dict[str, float]:
        if not self.totals:
            return {}
        dev = next((v.device for v in self.totals.values() if v.device.type != "cpu"), torch.device("cpu"))
        vals = torch.stack([v.to(dev).reshape(()) for v in self.totals.values()]).tolist()  # one device->host copy
        return dict(zip(self.totals, vals))
