"""RolloutGroup: the driver's handle on a restartable group of rollout actors.

The driver talks to these, never to actors directly, so fault handling
(re-issuing a lost batch on a restarted actor, with the latest weights) lives
in one place.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from raydiff.engine.datapath import RolloutBatch
from raydiff.engine.rollouts.worker import RolloutWorker

log = logging.getLogger("raydiff.rollouts")
RESTART_GRACE_S = 30.0  # how long a re-issue waits for a restarting worker before using another one


class RolloutFailed(RuntimeError):
    """A rollout batch could not be produced within `rollout.max_batch_retries` re-issues (or a weight update was rejected)."""


def _cause_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    first = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {first}"


def _rollout_failure(err: BaseException, req, epoch, attempts: int) -> RolloutFailed:
    """A clear error for the driver: which batch, what failed last, the knobs."""
    cause = getattr(err, "cause", None) or err
    hint = " Raise rollout.max_batch_retries if the cluster loses nodes often."
    if "out of memory" in str(cause).lower() or type(cause).__name__ == "OutOfMemoryError":
        hint = (" The GPU ran out of memory: lower rollout.decode_chunk (VAE latents per call) or sampling.batch_size, "
                "and compare with `raydiff plan CONFIG`.")
    elif isinstance(err, GetTimeoutError):
        hint = " Raise rollout.task_timeout_s if batches are this slow."
    where = f"epoch {epoch}" if epoch is not None else "a re-sample"
    return RolloutFailed(f"rollout batch of worker {req[0]} ({where}, {len(req[1])} prompts, seed {req[2]}) failed "
                         f"{attempts} time(s), last: {_cause_text(err)}.{hint}")


def _wait_alive(actor, timeout_s: float) -> bool:
    """True once a (possibly restarting) actor answers; False if it is dead for good or silent past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        except ActorDiedError:
            return False  # out of restarts (or killed for good)
        except (RayActorError, GetTimeoutError):
            time.sleep(0.5)  # restarting
    return False


class RolloutGroup:
    """N RolloutWorker actors; batches are dispatched per epoch and re-issued when anything fails.

    Fault policy: any RayError while fetching a batch (a task error such as a reward-service
    error or CUDA OOM, a dead or restarting actor, ObjectLostError after a node loss,
    OwnerDiedError) or a fetch past `rollout.task_timeout_s` (the worker is then restarted)
    re-issues that batch, with the latest weights, on its worker once it is back, else on
    another live one (a worker that does not come back is marked down and its share of each
    epoch goes to live workers until it answers again); after `rollout.max_batch_retries` re-issues the run stops with
    RolloutFailed naming the batch and the last error. Every weight update's answer is checked.
    """

    def __init__(self, cfg, needs=None, worker_cls=RolloutWorker):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raydiff.engine.cluster.placement import (
            create_placement_group,
            role_bundles,
        )

        r = cfg.rollout
        # The pending placement group is the autoscaler's demand; impossible asks fail at once.
        self.pg = create_placement_group("rollout", role_bundles(r), strategy=r.placement_strategy, timeout_s=r.placement_timeout_s)
        self.actors = [
            ray.remote(worker_cls)
            .options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.resources or None,
                     max_restarts=r.max_restarts, max_task_retries=0, name=f"raydiff-rollout-{i}-{id(self):x}",
                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
            .remote(cfg, i, needs)
            for i in range(r.num_workers)
        ]
        self.timeout_s, self.max_retries = r.task_timeout_s, r.max_batch_retries
        self.world = cfg.learner.num_workers  # a batch's tensors are cut into one piece per learner rank (engine/datapath.py)
        ray.get([a.ready.remote() for a in self.actors], timeout=r.placement_timeout_s + r.task_timeout_s)
        self.pending: dict[int, list] = {}
        # Per worker, batches started whose `finish` is not issued yet: (epoch, index, key ref), FIFO.
        # At most `lag` stay open, so a worker holds at most lag + 1 batches awaiting scores.
        self.unfinished = [deque() for _ in self.actors]
        self.lag = r.max_scoring_in_flight - 1 if r.overlap_scoring else 0
        self.latest_update = None
        self.acks: list[tuple[int, object]] = []  # (worker, ref of set_weights' answer) not yet checked
        self.down: dict[int, object] = {}  # worker -> pending `ready` probe: not answering, its batches go elsewhere
        self.reissued = 0

    def _live(self, worker: int) -> int:
        """`worker`, or a live stand-in while it is down (its node lost, its restart not placed yet).
        Sampling depends on the request's seed and the weights, not on the worker, so any worker will do."""
        for i in list(self.down):  # a down worker is back once its probe answers
            done, _ = ray.wait([self.down[i]], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                    del self.down[i]
                    if self.latest_update is not None:
                        self.acks.append((i, self.actors[i].set_weights.remote(self.latest_update, True)))
                except RayError:
                    self.down[i] = self.actors[i].ready.remote()
        if worker not in self.down:
            return worker
        live = [i for i in range(len(self.actors)) if i not in self.down]
        return live[worker % len(live)] if live else worker

    def dispatch(self, epoch: int, requests: list[tuple[int, list[str], int]]) -> None:
        """Queue `start` for every request; `finish` of a worker's batch follows `lag` starts later (overlap)."""
        if epoch in self.pending:
            return
        self.pending[epoch] = entries = []
        offset = 0  # each batch's first sample in the epoch: says which learner rank gets which sample
        for req in requests:
            worker = self._live(req[0])
            self.reissued += worker != req[0]  # a down worker's batch sent to a stand-in counts as re-issued
            entries.append([req, None, offset])
            offset += len(req[1])
            self.unfinished[worker].append((epoch, len(entries) - 1, self.actors[worker].start.remote(req[1], req[2])))
            while len(self.unfinished[worker]) > self.lag:
                self._issue_finish(worker)

    def _issue_finish(self, worker: int) -> None:
        epoch, index, key_ref = self.unfinished[worker].popleft()
        if epoch in self.pending:
            entry = self.pending[epoch][index]
            entry[1] = self.actors[worker].finish_parts.options(num_returns=2 + self.world).remote(key_ref, entry[2], self.world)
        else:  # dropped by reset(): still finish it, so the worker frees the batch
            self.actors[worker].finish.remote(key_ref)

    def gather(self, epoch: int) -> list[RolloutBatch]:
        """The epoch's batches in request order: metadata fetched, images and tensor pieces as refs."""
        for worker, queue in enumerate(self.unfinished):  # this epoch's (and older) open batches: finish now
            while queue and queue[0][0] <= epoch:
                self._issue_finish(worker)
        out = [self._resolve(req, refs, epoch, offset) for req, refs, offset in self.pending.pop(epoch)]
        self._check_acks()
        return out

    def _resolve(self, req, refs, epoch, offset: int) -> RolloutBatch:
        """The batch behind `refs` (its metadata fetched), re-issued (bounded) whenever fetching it fails."""
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            try:
                if refs is None:
                    refs = self._reissue(req, offset)
                return RolloutBatch(ray.get(refs[0], timeout=self.timeout_s), refs[1], list(refs[2:]), offset)
            except GetTimeoutError as e:
                last = e
                log.warning("rollout worker %d: no batch within rollout.task_timeout_s=%g s; restarting it", req[0], self.timeout_s)
                ray.kill(self.actors[self._live(req[0])], no_restart=False)
            except RayError as e:
                last = e
                log.warning("rollout worker %d: batch failed (%s); re-issuing it (%d/%d)", req[0], _cause_text(e), attempt + 1, self.max_retries)
            refs = None
        failure = _rollout_failure(last, req, epoch, self.max_retries + 1)
        log.error("%s", failure)
        raise failure from last

    def _reissue(self, req, offset: int):
        """Queue `req` again, with the latest weights, on its worker once alive, else on another live one; its refs."""
        worker, prompts, seed = req
        # Its own worker if it is back within a short grace (a restart on a live node takes seconds),
        # else any live one; a worker that does not answer is marked down until its probe answers.
        others = [i for i in range(len(self.actors)) if i != worker and i not in self.down]
        order = others + [worker] if worker in self.down else [worker] + others
        for i in order:
            actor = self.actors[i]
            if not _wait_alive(actor, min(self.timeout_s, RESTART_GRACE_S)):
                self.down[i] = actor.ready.remote()
                continue
            self.down.pop(i, None)
            if self.latest_update is not None:
                ok = ray.get(actor.set_weights.remote(self.latest_update, True), timeout=self.timeout_s)
                if not ok:
                    raise RolloutFailed(f"rollout worker {i} rejected the latest weight update (checksum or order; see its log)")
            self.reissued += 1
            return actor.generate_parts.options(num_returns=2 + self.world).remote(prompts, seed, offset, self.world)
        raise RolloutFailed(f"no rollout worker is alive to re-issue worker {worker}'s batch (rollout.max_restarts exhausted on all)")

    def regenerate(self, req: tuple[int, list[str], int], offset: int = 0) -> RolloutBatch:
        """Sample `req` (batch at `offset` in its epoch) again (its worker, restarted if needed, else another) with the latest weights."""
        return self._resolve(req, None, None, offset)

    def push_weights(self, update_ref, rewind: bool = False) -> list:
        """Queue the update on every actor behind its current batches (actor tasks run in order);
        `rewind`: an older version is expected (the learner restarted from a checkpoint). Refs of the swaps."""
        self.latest_update = update_ref
        sent = [(i, a.set_weights.remote(update_ref, rewind)) for i, a in enumerate(self.actors)]
        self.acks += sent
        return [ref for _, ref in sent]

    def _check_acks(self) -> None:
        """Answers of updates already applied: a rejected one stops the run (a dead actor gets the latest on re-issue)."""
        if not self.acks:
            return
        done, _ = ray.wait([r for _, r in self.acks], num_returns=len(self.acks), timeout=0)
        done = set(done)
        keep = []
        for worker, ref in self.acks:
            if ref not in done:
                keep.append((worker, ref))
                continue
            try:
                ok = ray.get(ref)
            except RayError:
                continue  # the actor died: a restarted one is given the latest update before its next re-issue
            if not ok:
                raise RolloutFailed(f"rollout worker {worker} rejected a weight update (checksum or order; see its log)")
        self.acks = keep

    def reset(self) -> None:
        """Forget every dispatched batch (after a learner restart rewound the run); workers still free them."""
        self.pending.clear()
        for worker in range(len(self.actors)):
            while self.unfinished[worker]:
                self._issue_finish(worker)

    def checksums(self) -> list[tuple[int, str] | None]:
        """(version, checksum) per worker after its queued updates; a restarted worker gets the latest update
        first; None for a worker that is down (not answering within the restart grace)."""
        out = []
        for i, a in enumerate(self.actors):
            if i in self.down:
                out.append(None)
                continue
            try:
                out.append(ray.get(a.weights_checksum.remote(), timeout=self.timeout_s))
            except (RayActorError, GetTimeoutError):
                if not _wait_alive(a, min(self.timeout_s, RESTART_GRACE_S)):
                    self.down[i] = a.ready.remote()
                    out.append(None)
                    continue
                if self.latest_update is not None:
                    ray.get(a.set_weights.remote(self.latest_update, True), timeout=self.timeout_s)
                out.append(ray.get(a.weights_checksum.remote(), timeout=self.timeout_s))
        return out

    def probe_storage(self, uri: str, name: str) -> list[str]:
        """Every rollout worker reads the driver's probe file: '' per worker that can."""
        from raydiff.engine.storage import read_probe

        return ray.get([a.__ray_call__.remote(lambda _self, u, n: read_probe(u, n), uri, name) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(self.pg)
