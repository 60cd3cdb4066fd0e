"""Ray-side handles for the roles: a restartable group of rollout actors and the learner.

The driver talks to these, never to actors directly, so fault handling
(re-issuing a lost batch on a restarted actor, with the latest weights) lives
in one place.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import ray
from ray.exceptions import RayActorError, RayTaskError

from raydiff.engine.learner import Learner
from raydiff.engine.rollout import BatchLost, RolloutWorker
from raydiff.types import Trajectory

log = logging.getLogger("raydiff.roles")


class RolloutFailed(RuntimeError):
    """A rollout batch failed inside its worker (not a lost worker: that batch is re-issued)."""


def _rollout_failure(err: RayTaskError, req, epoch: int) -> RolloutFailed:
    """A clear error for the driver: which batch, what failed, and the knobs for out-of-memory."""
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    hint = ""
    if "out of memory" in str(cause).lower() or type(cause).__name__ == "OutOfMemoryError":
        hint = (" The GPU ran out of memory: lower rollout.decode_chunk (VAE latents per call) or sampling.batch_size, "
                "and compare with `raydiff plan CONFIG`.")
    return RolloutFailed(f"rollout worker {req[0]} failed on its batch of epoch {epoch} ({len(req[1])} prompts, seed {req[2]}): {text}.{hint}")


def _wait_alive(actor, timeout_s: float = 300.0) -> None:
    """Block until a (possibly restarting) actor answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=timeout_s)
            return
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class RolloutGroup:
    """N RolloutWorker actors; batches are dispatched per epoch and re-issued if an actor dies."""

    def __init__(self, cfg, needs=None, worker_cls=RolloutWorker):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raydiff.engine.placement import create_placement_group, role_bundles

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
        ray.get([a.ready.remote() for a in self.actors])
        self.pending: dict[int, list] = {}
        # Per worker, batches started whose `finish` is not issued yet: (epoch, index, key ref), FIFO.
        # At most `lag` stay open, so a worker holds at most lag + 1 batches awaiting scores.
        self.unfinished = [deque() for _ in self.actors]
        self.lag = r.max_scoring_in_flight - 1 if r.overlap_scoring else 0
        self.latest_update = None
        self.reissued = 0

    def dispatch(self, epoch: int, requests: list[tuple[int, list[str], int]]) -> None:
        """Queue `start` for every request; `finish` of a worker's batch follows `lag` starts later (overlap)."""
        if epoch in self.pending:
            return
        self.pending[epoch] = entries = []
        for req in requests:
            worker = req[0]
            entries.append([req, None])
            self.unfinished[worker].append((epoch, len(entries) - 1, self.actors[worker].start.remote(req[1], req[2])))
            while len(self.unfinished[worker]) > self.lag:
                self._issue_finish(worker)

    def _issue_finish(self, worker: int) -> None:
        epoch, index, key_ref = self.unfinished[worker].popleft()
        self.pending[epoch][index][1] = self.actors[worker].finish.remote(key_ref)

    def gather(self, epoch: int) -> list[Trajectory]:
        for worker, queue in enumerate(self.unfinished):  # this epoch's (and older) open batches: finish now
            while queue and queue[0][0] <= epoch:
                self._issue_finish(worker)
        out = []
        for req, ref in self.pending.pop(epoch):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:
                log.warning("rollout worker %d died (%s); re-issuing its batch", req[0], type(e).__name__)
                out.append(self.regenerate(req))
            except RayTaskError as e:
                if isinstance(getattr(e, "cause", None), BatchLost):
                    log.warning("rollout worker %d restarted after sampling; re-issuing its batch", req[0])
                    out.append(self.regenerate(req))
                    continue
                failure = _rollout_failure(e, req, epoch)
                log.error("%s", failure)
                raise failure from e
        return out

    def regenerate(self, req: tuple[int, list[str], int]) -> Trajectory:
        """Sample `req` again on its worker (restarted if needed) with the latest weights."""
        worker, prompts, seed = req
        actor = self.actors[worker]
        for attempt in range(3):
            try:
                _wait_alive(actor)
                if self.latest_update is not None:
                    ray.get(actor.set_weights.remote(self.latest_update))
                self.reissued += 1
                return ray.get(actor.generate.remote(prompts, seed))
            except RayActorError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def push_weights(self, update_ref) -> list:
        """Queue the update on every actor behind its current batches (actor tasks run in order); refs of the swaps."""
        self.latest_update = update_ref
        return [a.set_weights.remote(update_ref) for a in self.actors]

    def checksums(self) -> list[tuple[int, str]]:
        """(version, checksum) per worker after its queued updates; a restarted worker gets the latest update first."""
        out = []
        for a in self.actors:
            try:
                out.append(ray.get(a.weights_checksum.remote()))
            except RayActorError:
                _wait_alive(a)
                if self.latest_update is not None:
                    ray.get(a.set_weights.remote(self.latest_update))
                out.append(ray.get(a.weights_checksum.remote()))
        return out

    def probe_storage(self, uri: str, name: str) -> list[str]:
        """Every rollout worker reads the driver's probe file: '' per worker that can."""
        from raydiff.engine.storage import read_probe

        return ray.get([a.__ray_call__.remote(lambda _self, u, n: read_probe(u, n), uri, name) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(self.pg)


class LearnerHandle:
    """One Learner in a Ray actor (the single-worker learner)."""

    def __init__(self, cfg):
        l = cfg.learner
        self.actor = ray.remote(Learner).options(
            num_cpus=l.num_cpus, num_gpus=1 if l.use_gpu else 0, resources=l.resources or None, name=f"raydiff-learner-{id(self):x}"
        ).remote(cfg)
        ray.get(self.actor.ready.remote())
        self.version = 0

    def train(self, batch: Trajectory) -> dict:
        metrics = ray.get(self.actor.train.remote(batch))
        self.version += 1
        return metrics

    def publish(self):
        return self.actor.publish.remote()

    def save(self, directory: str) -> dict:
        return ray.get(self.actor.save.remote(str(directory)))

    def load(self, directory: str) -> None:
        ray.get(self.actor.load.remote(str(directory)))
        self.version = ray.get(self.actor.__ray_call__.remote(lambda self: self.version))

    def checksums(self) -> list[str]:
        update = ray.get(self.publish())
        return [update["checksum"]]

    def probe_storage(self, uri: str, name: str) -> list[str]:
        from raydiff.engine.storage import read_probe

        return [ray.get(self.actor.__ray_call__.remote(lambda _self, u, n: read_probe(u, n), uri, name))]

    def shutdown(self) -> None:
        ray.kill(self.actor, no_restart=True)
