"""Staleness policy at the point of use: a batch made by version v is trained at learner version u.

u − v ≤ max_staleness: used as is. Beyond: `drop` (re-sample with fresh weights)
or `keep` (train with importance weight `stale_weight ** (u − v − max_staleness)`).
The decoupled PPO objective (algorithms/common.py) corrects for the behaviour
policy; the weight only damps batches that are older than the bound allows.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch

from raydiff.types import Trajectory


class StalenessGate:
    def __init__(self, max_staleness: int, policy: Literal["drop", "keep"] = "drop", stale_weight: float = 0.5):
        self.max_staleness, self.policy, self.stale_weight = max_staleness, policy, stale_weight
        self.histogram: Counter = Counter()
        self.dropped = 0

    def admit(self, batch: Trajectory, learner_version: int) -> Trajectory | None:
        """Return the batch to train on (maybe re-weighted), or None if it must be re-sampled."""
        staleness = learner_version - batch.version
        if staleness < 0:
            raise RuntimeError(f"batch from future version {batch.version} at learner version {learner_version}: weight sync is broken")
        self.histogram[staleness] += 1
        batch.staleness = torch.full((len(batch),), staleness, dtype=torch.int64)  # per sample: batches get concatenated
        batch.max_staleness = staleness
        if staleness <= self.max_staleness:
            return batch
        if self.policy == "drop":
            self.dropped += 1
            return None
        w = self.stale_weight ** (staleness - self.max_staleness)
        batch.weights = torch.full((len(batch),), w, dtype=torch.float32)
        return batch

    def retract(self, batch: Trajectory) -> None:
        """`batch` was admitted, then lost before training (its tensors): it leaves the histogram; its replacement is admitted anew."""
        self.histogram[batch.max_staleness] -= 1
        if not self.histogram[batch.max_staleness]:
            del self.histogram[batch.max_staleness]
