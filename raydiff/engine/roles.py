"""Ray-side handles for the roles: a restartable group of rollout actors and the learner.

The driver talks to these, never to actors directly, so fault handling
(re-issuing a lost batch on a restarted actor, with the latest weights) lives
in one place.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import RayActorError

from raydiff.engine.learner import Learner
from raydiff.engine.rollout import RolloutWorker
from raydiff.types import Trajectory

log = logging.getLogger("raydiff.roles")


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

    def __init__(self, cfg, needs=None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raydiff.engine.placement import create_placement_group, role_bundles

        r = cfg.rollout
        # The pending placement group is the autoscaler's demand; impossible asks fail at once.
        self.pg = create_placement_group("rollout", role_bundles(r), strategy=r.placement_strategy, timeout_s=r.placement_timeout_s)
        self.actors = [
            ray.remote(RolloutWorker)
            .options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.resources or None,
                     max_restarts=r.max_restarts, max_task_retries=0, name=f"raydiff-rollout-{i}-{id(self):x}",
                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
            .remote(cfg, i, needs)
            for i in range(r.num_workers)
        ]
        ray.get([a.ready.remote() for a in self.actors])
        self.pending: dict[int, list] = {}
        self.latest_update = None
        self.reissued = 0

    def dispatch(self, epoch: int, requests: list[tuple[int, list[str], int]]) -> None:
        if epoch in self.pending:
            return
        self.pending[epoch] = [(req, self.actors[req[0]].generate.remote(req[1], req[2])) for req in requests]

    def gather(self, epoch: int) -> list[Trajectory]:
        out = []
        for req, ref in self.pending.pop(epoch):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:
                log.warning("rollout worker %d died (%s); re-issuing its batch", req[0], type(e).__name__)
                out.append(self.regenerate(req))
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

    def push_weights(self, update_ref) -> None:
        """Queue the update on every actor behind its current batches (actor tasks run in order)."""
        self.latest_update = update_ref
        for a in self.actors:
            a.set_weights.remote(update_ref)

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

    def save(self, directory: str) -> None:
        ray.get(self.actor.save.remote(directory))

    def load(self, directory: str) -> None:
        ray.get(self.actor.load.remote(directory))
        self.version = ray.get(self.actor.__ray_call__.remote(lambda self: self.version))

    def checksums(self) -> list[str]:
        update = ray.get(self.publish())
        return [update["checksum"]]

    def shutdown(self) -> None:
        ray.kill(self.actor, no_restart=True)
