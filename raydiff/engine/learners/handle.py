"""LearnerHandle: the single-worker learner in one Ray actor, behind the interface the driver uses
for every learner (the Ray Train group's is `learners.distributed.GroupLearnerHandle`)."""

from __future__ import annotations

import ray

from raydiff.engine.datapath import EpochBatch, lost_error
from raydiff.engine.learners.learner import Learner
from raydiff.types import Trajectory


class LearnerHandle:
    """One Learner in a Ray actor (the single-worker learner)."""

    def __init__(self, cfg):
        l = cfg.learner
        self.actor = ray.remote(Learner).options(
            num_cpus=l.num_cpus, num_gpus=1 if l.use_gpu else 0, resources=l.resources or None, name=f"raydiff-learner-{id(self):x}"
        ).remote(cfg)
        ray.get(self.actor.ready.remote())
        self.version = 0

    def train(self, batch: Trajectory | EpochBatch) -> dict:
        if isinstance(batch, EpochBatch):  # refs + metadata: the learner fetches the pieces itself (engine/datapath.py)
            batch = batch.shards(1)[0]
        metrics = ray.get(self.actor.train.remote(batch))
        lost = lost_error([metrics])
        if lost is not None:
            raise lost
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
