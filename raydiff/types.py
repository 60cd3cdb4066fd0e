"""Data that crosses role boundaries: conditioning and trajectory batches.

Shapes: N samples, T denoising steps, latents (C, h, w), L text tokens, D embed dim.
Everything is a CPU tensor or numpy array when it leaves a worker, so batches
move through the Ray object store without device handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import numpy as np
import torch


@dataclass
class Conditioning:
    """Text conditioning for N samples (positive and CFG-negative branch), as the model family encodes it."""

    embeds: torch.Tensor  # (N, L, D)
    neg_embeds: Optional[torch.Tensor] = None  # (N, L, D); None for CFG-free families (FLUX)
    pooled: Optional[torch.Tensor] = None  # (N, P) SDXL, SD3, FLUX
    neg_pooled: Optional[torch.Tensor] = None  # (N, P) SDXL, SD3
    time_ids: Optional[torch.Tensor] = None  # (N, 6) SDXL only

    def index(self, idx) -> "Conditioning":
        return Conditioning(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)})

    def to(self, device, dtype=None) -> "Conditioning":
        return Conditioning(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device, dtype)) for f in fields(self)})

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        out = {}
        for f in fields(Conditioning):
            vals = [getattr(c, f.name) for c in items]
            out[f.name] = None if vals[0] is None else torch.cat(vals)
        return Conditioning(**out)


@dataclass
class PromptBatch:
    """What a synchronous (sample-with-gradients) learner step receives: prompts and a noise seed."""

    prompts: list[str]
    seed: int
    version: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def shard(self, rank: int, world_size: int) -> "PromptBatch":
        return PromptBatch(self.prompts[rank::world_size], self.seed * 1000003 + rank, self.version)


@dataclass
class Trajectory:
    """A batch of trajectories x_T -> x_0 (DDIM or flow SDE) with per-step log-probs, made by policy `version`.

    Flow models store the per-step noise level a in extras['noise_level'] (N, T) (0 = a deterministic step
    outside the SDE window, whose log-prob is NaN); `eta` is then the configured a."""

    prompts: list[str]
    # The big fields are None in the driver's metadata copy (engine/datapath.py: they go to the learner ranks directly).
    latents: Optional[torch.Tensor]  # (N, T+1, C, h, w): x_T, ..., x_0, in the sampling dtype (bf16 on GPU, fp32 on CPU)
    timesteps: Optional[torch.Tensor]  # (T,) scheduler timesteps (flow: σ·1000), same for the whole batch
    log_probs: Optional[torch.Tensor]  # (N, T) log p(x_{t-1} | x_t, c), mean over C*h*w, float32 (NaN on deterministic steps)
    cond: Optional[Conditioning]
    images: Optional[np.ndarray]  # (N, H, W, 3) uint8
    version: int  # policy version that sampled it
    num_steps: int  # scheduler.set_timesteps(num_steps) used, needed to recompute log-probs
    guidance_scale: float
    eta: float
    rewards: Optional[np.ndarray] = None  # (N,) weighted total
    reward_components: dict = field(default_factory=dict)  # name -> (N,)
    advantages: Optional[torch.Tensor] = None  # (N,)
    weights: Optional[torch.Tensor] = None  # (N,) importance weights for stale batches (1 = none)
    staleness: Optional[torch.Tensor] = None  # (N,) int64 per sample: learner version at admission − its sampling version; None = all 0
    max_staleness: int = 0  # max of `staleness` over the whole (unsharded) batch: the same on every learner rank
    group_ids: Optional[torch.Tensor] = None  # (N,) int64: samples with one id were drawn for one prompt together (engine/groups.py)
    extras: dict = field(default_factory=dict)  # algorithm-specific tensors, batch-first
    timings: dict = field(default_factory=dict)  # seconds spent per phase

    def __len__(self) -> int:
        return len(self.prompts)

    def shard(self, rank: int, world_size: int) -> "Trajectory":
        """Rank r's slice of the batch for data-parallel learners (strided, so shards differ by at most 1)."""
        return self.index(list(range(rank, len(self), world_size)))

    def index(self, idx) -> "Trajectory":
        """Select samples (tensor/list index) keeping per-batch fields."""
        idx_t = torch.as_tensor(idx)
        if idx_t.dtype == torch.bool:  # a mask: the prompt list needs positions
            idx_t = idx_t.nonzero().flatten()
        elif idx_t.numel() == 0:  # [] becomes a float tensor, which cannot index
            idx_t = idx_t.long()
        idx_np = idx_t.numpy()
        pick = lambda v: None if v is None else (v[idx_t] if isinstance(v, torch.Tensor) else v[idx_np])
        return replace(
            self,
            prompts=[self.prompts[i] for i in idx_np.tolist()],
            latents=pick(self.latents), log_probs=pick(self.log_probs), cond=None if self.cond is None else self.cond.index(idx_t),
            images=pick(self.images), rewards=pick(self.rewards),
            reward_components={k: pick(v) for k, v in self.reward_components.items()},
            advantages=pick(self.advantages), weights=pick(self.weights), staleness=pick(self.staleness),
            group_ids=pick(self.group_ids),
            extras={k: pick(v) for k, v in self.extras.items()},
        )

    def sample_staleness(self) -> torch.Tensor:
        """(N,) int64 staleness per sample (zeros when never set)."""
        return self.staleness if self.staleness is not None else torch.zeros(len(self), dtype=torch.int64)

    def pad_to(self, n: int) -> "Trajectory":
        """Append copies of the last sample with weight 0 up to `n` samples (equal shards on every rank).

        A padded copy contributes nothing to a weighted loss; it only adds one to the mean's
        denominator on its rank (a gradient scale of len/n there).
        """
        if n <= len(self):
            return self
        weights = self.weights if self.weights is not None else torch.ones(len(self))
        out = self.index(list(range(len(self))) + [len(self) - 1] * (n - len(self)))
        out.weights = torch.cat([weights, torch.zeros(n - len(self))]).float()
        return out

    @staticmethod
    def cat(items: list["Trajectory"]) -> "Trajectory":
        """Concatenate batches sampled with the same settings (version = the oldest)."""
        first = items[0]
        cat_opt = lambda vs: None if vs[0] is None else (torch.cat(vs) if isinstance(vs[0], torch.Tensor) else np.concatenate(vs))
        return replace(
            first,
            prompts=sum((t.prompts for t in items), []),
            latents=cat_opt([t.latents for t in items]), log_probs=cat_opt([t.log_probs for t in items]),
            cond=None if first.cond is None else Conditioning.cat([t.cond for t in items]), images=cat_opt([t.images for t in items]),
            version=min(t.version for t in items),
            staleness=torch.cat([t.sample_staleness() for t in items]),
            max_staleness=max(t.max_staleness for t in items),
            group_ids=None if any(t.group_ids is None for t in items) else torch.cat([t.group_ids for t in items]),
            rewards=cat_opt([t.rewards for t in items]),
            reward_components={k: cat_opt([t.reward_components[k] for t in items]) for k in first.reward_components},
            advantages=cat_opt([t.advantages for t in items]),
            weights=None if all(t.weights is None for t in items) else torch.cat(
                [t.weights if t.weights is not None else torch.ones(len(t)) for t in items]).float(),
            extras={k: cat_opt([t.extras[k] for t in items]) for k in first.extras},
            timings={k: sum(t.timings.get(k, 0.0) for t in items) for k in first.timings},
        )
