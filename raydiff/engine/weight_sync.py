"""Weight sync: the update a learner publishes and the check a rollout worker makes before loading it.

An update is `{version, state, checksum}`: the trainable weights by parameter name, the policy version
they are, and a dtype-independent checksum (`models.lora.state_checksum`), so a bf16 learner and an
fp32 rollout worker agree. The driver owns the update object (a rank's own ref would die with the
rank), queues it on every rollout actor behind the batches in flight (actor tasks run in order, so a
swap lands between samplings) and checks the answers (`RolloutGroup.push_weights` / `_check_acks`).
A worker accepts an update only if it is newer than what it holds (or the learner rewound to a
checkpoint) and its bytes hash to the checksum sent with it.
"""

from __future__ import annotations

from typing import Optional

import torch

from raydiff.models.lora import state_checksum


def make_update(version: int, state: dict[str, torch.Tensor]) -> dict:
    """The published form of `state` at `version`."""
    return {"version": version, "state": state, "checksum": state_checksum(state)}


def verdict(update: dict, held_version: int, held_checksum: str, rewind: bool = False) -> Optional[str]:
    """Why `update` must not be loaded by a worker holding (held_version, held_checksum), or None to load it.

    'held' (already loaded) is not a rejection: the caller answers True without loading again."""
    version, checksum = update["version"], update["checksum"]
    if version == held_version and checksum == held_checksum:
        return "held"
    if version <= held_version and held_version > 0 and not rewind:
        return f"out of order: v{version} after v{held_version}"
    actual = state_checksum(update["state"])
    if actual != checksum:
        return f"checksum mismatch: v{version} hashes to {actual[:12]}, sent with {checksum[:12]}"
    return None
