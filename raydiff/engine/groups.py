"""Group sampling: which prompts, seeds and group ids each rollout batch of an epoch gets.

Group-relative algorithms (Flow-GRPO, DiffusionNFT) declare `Needs.samples_per_prompt = k`:
every epoch draws G = (batches · workers · batch_size) / k prompts and samples each k times.

    epoch e, rng = default_rng([train.seed, e])
    prompts p_0 .. p_{G-1}      distinct while G ≤ |prompt set| (as flow_grpo's DistributedKRepeatSampler), else i.i.d.
    flat slots  [p_0]*k + [p_1]*k + ...       group g = slots g·k .. g·k + k − 1, id = e·G + g
    request (b, w) = slots (b·W + w)·n .. +n    with one noise seed from rng each

Invariants, enforced here:
- The plan is a pure function of (train.seed, epoch): a re-issued batch (dead rollout actor) and a
  resumed run get the same prompts, seeds and group ids, so a group stays whole (k members, one
  prompt) whatever happens to the worker that sampled part of it.
- A group is contiguous in the epoch's slots; it spans two (or more) rollout batches, possibly on
  different workers, when k does not divide the batch size. The group id, not the batch, says who
  belongs together; group-wise rewards, which each rollout worker scores on its own batch, therefore
  need k | sampling.batch_size (checked by `check_group_layout`).
- k = 1 keeps the i.i.d. draw order of earlier raydiff versions exactly (same prompts and seeds),
  every sample its own group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Request = tuple[int, list[str], int]  # (rollout worker, prompts, noise seed): what RolloutGroup dispatches


@dataclass(frozen=True)
class EpochPlan:
    requests: list[Request]
    group_ids: list[np.ndarray]  # per request, (n,) int64: the group of each sample


def check_group_layout(k: int, batch_size: int, num_workers: int, batches_per_epoch: int, group_wise_rewards: list[str]) -> None:
    """Raise naming the fields when an epoch cannot be cut into whole groups of k."""
    total = batch_size * num_workers * batches_per_epoch
    if k < 1:
        raise ValueError(f"samples per prompt must be ≥ 1 (got {k})")
    if total % k:
        raise ValueError(
            f"an epoch samples sampling.batch_size × rollout.num_workers × train.batches_per_epoch = {batch_size} × {num_workers} × "
            f"{batches_per_epoch} = {total} images, not a multiple of the group size {k} (algorithm.group_size): change one of them "
            f"so that whole groups fit (e.g. train.batches_per_epoch={_fitting_batches(k, batch_size * num_workers)})")
    if group_wise_rewards and batch_size % k:
        raise ValueError(
            f"group-wise rewards {group_wise_rewards} score each rollout batch alone, and groups of {k} (algorithm.group_size) span "
            f"batches of sampling.batch_size={batch_size}: make sampling.batch_size a multiple of {k}")


def _fitting_batches(k: int, per_batch_round: int) -> int:
    return k // int(np.gcd(k, per_batch_round))


def plan_epoch(prompts: list[str], seed: int, epoch: int, batches_per_epoch: int, num_workers: int, batch_size: int,
               k: int = 1) -> EpochPlan:
    """Deterministic (worker, prompts, seed) requests for every rollout batch of `epoch`, and their group ids."""
    rng = np.random.default_rng([seed, epoch])
    n_req = batches_per_epoch * num_workers
    if k == 1:  # the i.i.d. draw of ungrouped algorithms, unchanged: prompts then seed, per request
        requests, ids = [], []
        for r in range(n_req):
            idx = rng.integers(0, len(prompts), batch_size)
            requests.append((r % num_workers, [prompts[i] for i in idx], int(rng.integers(0, 2**31 - 1))))
            ids.append(epoch * n_req * batch_size + r * batch_size + np.arange(batch_size, dtype=np.int64))
        return EpochPlan(requests, ids)
    total = n_req * batch_size
    groups = total // k
    picks = rng.permutation(len(prompts))[:groups] if groups <= len(prompts) else rng.integers(0, len(prompts), groups)
    slot_prompt = np.repeat(picks, k)
    slot_group = epoch * groups + np.repeat(np.arange(groups, dtype=np.int64), k)
    requests, ids = [], []
    for r in range(n_req):
        s = slice(r * batch_size, (r + 1) * batch_size)
        requests.append((r % num_workers, [prompts[i] for i in slot_prompt[s]], int(rng.integers(0, 2**31 - 1))))
        ids.append(slot_group[s].copy())
    return EpochPlan(requests, ids)
