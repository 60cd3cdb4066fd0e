"""The data path: trajectory tensors go from rollout workers to the learner ranks as ObjectRefs.

A rollout worker ends a batch with `finish_parts(key, offset, world)`, called with
`num_returns = 2 + world`, so every object is owned by the caller (the driver) and
outlives the worker process (not its node: then it is lost and the batch re-sampled):

    0          metadata   the Trajectory without its big fields: prompts, rewards and their
                          components, version, timings, group ids and the small extras
                          (≤ 2-D: step_rewards, noise_level): all that algorithm.prepare,
                          the staleness gate, metrics and experience records read
    1          images     uint8 (N, H, W, 3): the driver fetches them only for an image grid
    2 + r      rank r's   latents, log-probs, timesteps, conditioning and the per-step extras
               piece      (≥ 3-D: eps, noise) of the samples whose index in the epoch
                          (offset + i) is r mod world: exactly the samples
                          `Trajectory.cat(epoch).shard(r, world)` gives rank r

The driver ray.get()s only the metadata (and images on grid epochs), runs algorithm.prepare
on the epoch's metadata, and sends rank r `ShardRefs`: the refs of its pieces plus its
slice of the prepared metadata (advantages, weights, staleness). Rank r fetches its pieces
itself (Ray pulls them node to node; never through the driver or the coordinator), joins
them with the slice and pads to the longest shard: bit for bit the shard the old
driver-side path built. Pieces stay in the sampling dtype (bf16 on GPU).

A piece that cannot be fetched (node lost, owner died, timeout) is reported by every rank
(the ranks agree before any collective, so none trains alone) and the driver gets
`TrajectoriesLost`, a RayError naming the batches: it re-samples them and trains again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import ray
import torch
from ray.exceptions import RayError

from raydiff.types import Conditioning, Trajectory

log = logging.getLogger("raydiff.datapath")
LOST = "data/lost_batches"  # a rank's result when pieces could not be fetched: the batch indices
DRIVER_FIELDS_DROPPED = ("latents", "log_probs", "timesteps", "cond", "images")


class TrajectoriesLost(RayError):
    """Learner ranks could not fetch the tensors of some rollout batches (their node died, their owner died,
    or the fetch timed out); nothing was trained. The driver re-samples `batches` (epoch batch indices)."""

    def __init__(self, batches: list[int], detail: str = ""):
        self.batches = sorted(set(batches))
        self.detail = detail
        super().__init__(batches)

    def __str__(self) -> str:
        return (f"learner ranks could not fetch the trajectories of rollout batches {self.batches} ({self.detail}); "
                "they are re-sampled (bounded by rollout.max_batch_retries)")


def payload_bytes(v: Any) -> int:
    """Bytes of the tensors, arrays and strings an object carries (what a fetch moves, give or take pickling)."""
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, dict):
        return sum(payload_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(payload_bytes(x) for x in v)
    if hasattr(v, "__dataclass_fields__"):
        return sum(payload_bytes(getattr(v, f)) for f in v.__dataclass_fields__)
    return 0


def _is_big(v) -> bool:
    """Per-step latent-shaped extras (N, T, C, h, w) go to the learner ranks; (N,) and (N, T) ones stay in the metadata."""
    return isinstance(v, torch.Tensor) and v.dim() >= 3


@dataclass
class TensorPiece:
    """One rank's samples of one rollout batch: what the learner needs and the driver does not."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    extras: dict = field(default_factory=dict)

    def index(self, idx: list[int]) -> "TensorPiece":
        i = torch.as_tensor(idx, dtype=torch.int64)
        return TensorPiece(self.latents[i], self.log_probs[i], self.timesteps, self.cond.index(i), {k: v[i] for k, v in self.extras.items()})


def rank_indices(n: int, offset: int, world: int, rank: int) -> list[int]:
    """Samples i of a batch at epoch offset `offset` that shard `rank` of `world` holds ((offset + i) % world == rank)."""
    return [i for i in range(n) if (offset + i) % world == rank]


def split_trajectory(traj: Trajectory, offset: int, world: int, final_only: bool = False) -> tuple:
    """(metadata, images, piece_0, ..., piece_{world-1}) of a scored batch (see the module docstring).

    `final_only` (Needs.final_latents_only): the learner gets x_0 alone (no trajectory, log-probs or extras)."""
    latents, log_probs, extras = traj.latents, traj.log_probs, traj.extras
    if final_only:
        latents, log_probs, extras = latents[:, -1:].contiguous(), log_probs[:, :0].contiguous(), {}
    whole = TensorPiece(latents, log_probs, traj.timesteps, traj.cond, {k: v for k, v in extras.items() if _is_big(v)})
    meta = replace(traj, latents=None, log_probs=None, timesteps=None, cond=None, images=None,
                   extras={k: v for k, v in extras.items() if not _is_big(v)})
    return (meta, traj.images, *(whole.index(rank_indices(len(traj), offset, world, r)) for r in range(world)))


@dataclass
class RolloutBatch:
    """A rollout batch on the driver: its metadata (fetched) and the refs of everything else (not fetched)."""

    meta: Trajectory
    images: Any  # ObjectRef of the uint8 images
    pieces: list  # ObjectRef per learner rank
    offset: int  # index of its first sample in the epoch


@dataclass
class ShardRefs:
    """What learner rank r receives: (batch index, ref of its piece) per batch, its slice of the prepared
    metadata, and the length every rank pads to."""

    parts: list[tuple[int, Any]]
    meta: Trajectory
    pad_to: int
    timeout_s: float


@dataclass
class EpochBatch:
    """An epoch's batches as the driver hands them to the learner: prepared metadata plus the pieces' refs."""

    meta: Trajectory  # algorithm.prepare'd metadata of all batches, in order
    batches: list[RolloutBatch]
    timeout_s: float = 600.0

    def __len__(self) -> int:
        return len(self.meta)

    def shards(self, world: int) -> list[ShardRefs]:
        n = len(self.meta)
        longest = -(-n // world)
        for b in self.batches:
            if len(b.pieces) != world:
                raise ValueError(f"rollout batch cut for {len(b.pieces)} learner ranks, the learner has {world}")
        return [ShardRefs([(i, b.pieces[r]) for i, b in enumerate(self.batches)], self.meta.shard(r, world), longest, self.timeout_s)
                for r in range(world)]


def _fetch(parts, timeout_s: float) -> tuple[list, list[int], str]:
    """Fetch the pieces (in parallel); (pieces, lost batch indices, first error)."""
    refs = [ref for _, ref in parts]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=True)
    got, lost, err = [], [], ""
    for b, ref in parts:
        try:
            piece = ray.get(ref, timeout=max(1.0, timeout_s / 10))
        except RayError as e:
            lost.append(b)
            cause = getattr(e, "cause", None) or e  # a task error's own exception, not Ray's wrapper
            err = err or f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            continue
        got.append(piece)
    return got, lost, err


def assemble(meta: Trajectory, pieces: list[TensorPiece]) -> Trajectory:
    """The trajectory shard: `meta`'s fields plus the pieces' tensors, concatenated in batch order (no dtype change)."""
    first = pieces[0]
    big = {k: torch.cat([p.extras[k] for p in pieces]) for k in first.extras}
    return replace(meta, latents=torch.cat([p.latents for p in pieces]), log_probs=torch.cat([p.log_probs for p in pieces]),
                   timesteps=first.timesteps, cond=Conditioning.cat([p.cond for p in pieces]), extras={**meta.extras, **big})


def receive(shard: ShardRefs, world: int) -> tuple[Optional[Trajectory], dict]:
    """On a learner rank: fetch, agree with the other ranks, assemble and pad.

    Returns (trajectory, {"data/bytes_to_learners": bytes fetched}), or (None, {LOST: batch indices lost on
    any rank, ...}): then no rank trains on this epoch (every rank learns the union before any collective,
    so none waits alone in one)."""
    pieces, lost, err = _fetch(shard.parts, shard.timeout_s)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        every = [None] * world
        torch.distributed.all_gather_object(every, (lost, err))
        lost = sorted({b for ls, _ in every for b in ls})
        err = next((e for _, e in every if e), err)
    if lost:
        log.warning("trajectories of batches %s could not be fetched: %s", lost, err)
        return None, {LOST: lost, "data/lost_error": err}
    return assemble(shard.meta, pieces).pad_to(shard.pad_to), {"data/bytes_to_learners": payload_bytes(pieces)}


def lost_error(results: list[dict]) -> Optional[TrajectoriesLost]:
    """TrajectoriesLost if any rank reported lost pieces."""
    lost = sorted({b for r in results if isinstance(r, dict) for b in r.get(LOST, [])})
    if not lost:
        return None
    return TrajectoriesLost(lost, next((r.get("data/lost_error", "") for r in results if isinstance(r, dict) and r.get(LOST)), ""))


def fetch_whole(batch: RolloutBatch, timeout_s: float) -> Trajectory:
    """The whole batch on the driver, samples in their original order (without images). For
    output.record_tensors (experience records carry latents and log-probs) and tests; never on the training path."""
    pieces = ray.get(batch.pieces, timeout=timeout_s)
    n, world = len(batch.meta), len(pieces)
    order = torch.as_tensor([i for r in range(world) for i in rank_indices(n, batch.offset, world, r)], dtype=torch.int64)
    inverse = torch.empty(n, dtype=torch.int64)
    inverse[order] = torch.arange(n)  # where sample i sits in the rank-order concatenation
    return assemble(batch.meta.index(order), pieces).index(inverse)


def fetch_images(batches: list[RolloutBatch], n: int, timeout_s: float) -> Optional[np.ndarray]:
    """The epoch's first `n` images (image-grid epochs only), fetched from the rollout workers' store; None if lost."""
    images, got = [], 0
    for b in batches:
        if got >= n:
            break
        try:
            images.append(ray.get(b.images, timeout=timeout_s))
        except RayError as e:  # the worker's node died since: no grid this epoch
            log.warning("image grid skipped: %s", type(e).__name__)
            return None
        got += len(images[-1])
    return np.concatenate(images)[:n] if images else None
