"""Data-parallel learners: the same `Learner` on every Ray Train worker, stepping a DeepSpeed engine.

    driver (Trainer) ── GroupLearnerHandle.train(EpochBatch) ──► LearnerGroup.run([refs_0..refs_{W-1}])
                                                              rank r: DistributedLearner.run_task(("train", refs_r))
                                                              fetches its pieces itself (engine/datapath.py)
    publish(): every rank gathers (collective under ZeRO-3); rank 0 puts the update
    into the object store and only its ObjectRef travels back to the driver.

Invariant: every rank runs every task in the same order with the same number of
backward calls (the DeepSpeed boundary step is a collective) and the same
forwards (ZeRO-3 all-gathers parameters in every forward); trajectory shards are
therefore padded to equal length with zero-weight copies, and minibatch counts
depend only on that length.
"""

from __future__ import annotations

import uuid

import ray
import torch

from raydiff.engine.datapath import LOST, EpochBatch, lost_error
from raydiff.engine.learners.learner import Learner
from raydiff.engine.storage import Scratch, Storage, join_uri, read_probe
from raydiff.engine.weight_sync import make_update
from raydiff.models.lora import export_weights, state_checksum
from raydiff.types import Trajectory


class _Container(torch.nn.Module):
    """The denoiser (UNet or transformer) plus algorithm modules as one module, so ZeRO-3 partitions and gathers all of them."""

    def __init__(self, denoiser, modules: dict):
        super().__init__()
        self.denoiser = denoiser
        self.extra = torch.nn.ModuleDict(modules)


class DistributedLearner:
    """What runs inside each Ray Train worker: a Learner whose stepper is DeepSpeed."""

    def __init__(self, cfg, rank: int, world_size: int, resume_from: str | None = None):
        from raydiff.engine.learners.deepspeed_stepper import DeepSpeedStepper

        use_gpu = cfg.learner.use_gpu and torch.cuda.is_available()

        def stepper(groups, learner_cfg, acc):
            self.container = _Container(self.learner.model.denoiser, self.learner.modules)
            return DeepSpeedStepper(self.container, groups, learner_cfg, acc, use_gpu)

        self.learner = _PreStepperLearner(cfg, rank, world_size, stepper, self)
        self.restored_from = resume_from  # reported to the driver at a (re)start
        if resume_from:
            self.load(resume_from)

    def checksum(self) -> str:
        """The trainable weights' checksum (a collective under ZeRO-3: every rank calls it)."""
        return state_checksum(self._denoiser_state())

    def run_task(self, task):
        kind = task[0]
        if kind == "train":
            metrics = self.learner.train(task[1])
            if LOST not in metrics:  # pieces lost: nothing trained (every rank knows), the driver re-samples
                self.learner.version = task[2]  # the driver's count: stays right across worker restarts
            return metrics
        if kind == "publish":
            return self.publish()
        if kind == "checksum":
            return self.checksum()
        if kind == "save":
            return self.save(task[1])
        if kind == "load":
            return self.load(task[1])
        if kind == "probe":  # can this rank's node read run storage? (storage.check_reachable)
            return read_probe(task[1], task[2])
        raise ValueError(f"unknown learner task {kind!r}")

    def _denoiser_state(self, full: dict | None = None) -> dict:
        """The denoiser's trainable weights, named as `trainable_state_dict(denoiser)` (gathers when `full` is None)."""
        full = self.learner.stepper.gathered_trainable_state() if full is None else full
        return {k[len("denoiser."):]: v for k, v in full.items() if k.startswith("denoiser.")}

    def publish(self):
        state = self._denoiser_state()  # collective under ZeRO-3: every rank calls it
        if self.learner.rank != 0:
            return None
        return [ray.put(make_update(self.learner.version, state))]  # wrapped: a bare ObjectRef would be resolved on return

    def save(self, directory: str) -> dict:
        """Collective. Every rank writes its DeepSpeed shard to node-local scratch and uploads it
        to `directory` (path or storage URI; file names differ per rank); rank 0 adds learner.pt
        and the diffusers export. Returns this rank's uploaded files for the manifest."""
        with Scratch("raydiff-ds-") as d:
            L = self.learner
            L.stepper.save_checkpoint(str(d / "deepspeed"), tag="state",
                                      client_state={"version": L.version, "rng": L.rng_state()})
            # DeepSpeed keeps client_state in rank 0's file only, so every rank would resume with
            # rank 0's RNG (other minibatch orders than an uninterrupted run): each rank saves its own.
            torch.save(L.rng_state(), d / "deepspeed" / f"rng_rank{L.rank}.pt")
            full = L.stepper.gathered_trainable_state()  # collective under ZeRO-3
            state = self._denoiser_state(full)
            if L.rank == 0:
                if L.stepper.zero_stage == 3:  # module params are partitioned: take the gathered trainable ones
                    modules = {name: {k.split(".", 2)[2]: v for k, v in full.items() if k.startswith(f"extra.{name}.")} for name in L.modules}
                else:
                    modules = {name: m.state_dict() for name, m in L.modules.items()}
                # Same layout as Learner.save minus the optimiser (that lives in deepspeed/): a
                # single-process Learner can load it too.
                torch.save({"weights": state, "modules": modules, "version": L.version, "rng": L.rng_state()}, d / "learner.pt")
                export_weights(L.model, d / "export", state=state)
            return Storage(directory).upload_dir(d, "")

    def load(self, directory: str) -> int:
        """Collective: every rank fetches all shards (ZeRO reads the other ranks' too) to scratch and loads."""
        L = self.learner
        with Scratch("raydiff-ds-") as d:
            Storage(directory).download_dir("deepspeed", d / "deepspeed")
            client = L.stepper.load_checkpoint(str(d / "deepspeed"), tag="state")
            own_rng = d / "deepspeed" / f"rng_rank{L.rank}.pt"
            rng = torch.load(own_rng, weights_only=False) if own_rng.is_file() else client["rng"]
        L.version = client["version"]
        L.set_rng_state(rng)
        return L.version


class _PreStepperLearner(Learner):
    """A Learner whose stepper factory may look at the built model (DeepSpeed wraps it)."""

    def __init__(self, cfg, rank, world_size, stepper_factory, owner):
        owner.learner = self
        super().__init__(cfg, rank, world_size, stepper_factory=stepper_factory)


RESTART_FILE = "ray_train/restart_from"  # in run storage: the checkpoint restarted workers load


class GroupLearnerHandle:
    """Driver-side: the LearnerHandle interface over a Ray Train LearnerGroup."""

    def __init__(self, cfg, run_dir: str):
        from raydiff.engine.learners.group import LearnerGroup

        self.cfg = cfg
        self.world = cfg.learner.num_workers
        # Restarted workers (Ray Train FailureConfig), on whatever node, load what this run-storage
        # file names: the checkpoint the driver saved or resumed from last in this run.
        self.storage = Storage(run_dir)
        self.storage.delete(RESTART_FILE)
        self.group = LearnerGroup(_WorkerFactory(cfg, self.storage.uri), cfg.learner,
                                  storage_path=join_uri(self.storage.uri, "ray_train"),
                                  name=f"learner-{uuid.uuid4().hex[:8]}", max_failures=cfg.learner.max_failures,
                                  ).start().wait_ready(cfg.learner.start_timeout_s)
        self.version = 0

    def _mark_restart_point(self, directory: str) -> None:
        self.storage.write_bytes(RESTART_FILE, str(directory).encode())

    def train(self, batch) -> dict:
        if isinstance(batch, EpochBatch):  # refs + metadata: each rank fetches its own pieces (engine/datapath.py)
            shards = batch.shards(self.world)
        else:
            shards = [batch.shard(r, self.world) for r in range(self.world)]
        if isinstance(batch, Trajectory):
            # Equal shard lengths on every rank, so every rank makes the same number of
            # backward calls (a DeepSpeed boundary step is a collective): the short ones get
            # a zero-weight copy of a sample (Trajectory.pad_to).
            longest = max(len(s) for s in shards)
            shards = [s.pad_to(longest) for s in shards]
        results = self.group.run([("train", s, self.version + 1) for s in shards])
        lost = lost_error(results)
        if lost is not None:
            raise lost
        self.version += 1
        merged = {}
        for k, v in results[0].items():
            vals = [r[k] for r in results if k in r]
            if not isinstance(v, (int, float)):
                merged[k] = v
            elif k.startswith("data/bytes"):  # bytes each rank fetched: the group's total
                merged[k] = sum(vals)
            else:
                merged[k] = max(vals) if k.endswith("max_dev") else sum(vals) / len(vals)
        return merged

    def publish(self):
        """The update as an object the driver owns: rank 0's own ref would die with rank 0
        (OwnerDiedError on every rollout worker's set_weights after a learner restart)."""
        return ray.put(ray.get(self.group.run([("publish",)] * self.world)[0][0]))

    @property
    def restart_point(self) -> str | None:
        """The checkpoint restarted ranks restore (what the driver marked last); None before any."""
        return self.storage.read_bytes(RESTART_FILE).decode().strip() if self.storage.exists(RESTART_FILE) else None

    def checksums(self) -> list[str]:
        return self.group.run([("checksum",)] * self.world)

    def save(self, directory: str) -> dict:
        """Every rank uploads its files to `directory`; all ranks' manifest entries, merged."""
        files = {}
        for rank_files in self.group.run([("save", str(directory))] * self.world):
            files.update(rank_files)
        return files

    def mark_complete(self, directory: str) -> None:
        """Called once the checkpoint holding `directory` is published: restarts resume from it."""
        self._mark_restart_point(directory)

    def load(self, directory: str) -> None:
        self.version = self.group.run([("load", str(directory))] * self.world)[0]
        self._mark_restart_point(directory)

    def probe_storage(self, uri: str, name: str) -> list[str]:
        """Every rank reads the driver's probe file: '' per rank that can."""
        return self.group.run([("probe", uri, name)] * self.world)

    def shutdown(self) -> None:
        self.group.shutdown()


class _WorkerFactory:
    """Picklable `make_worker(rank, world)` for LearnerGroup; a restarted worker resumes from the restart file."""

    def __init__(self, cfg, run_uri: str):
        self.cfg, self.run_uri = cfg, run_uri

    def __call__(self, rank: int, world_size: int) -> DistributedLearner:
        store = Storage(self.run_uri)
        resume = [store.read_bytes(RESTART_FILE).decode().strip() if store.exists(RESTART_FILE) else None]
        if world_size > 1:  # rank 0 decides: ranks reading the file at different times could restore different steps
            import torch.distributed as dist

            dist.broadcast_object_list(resume, src=0)
        return DistributedLearner(self.cfg, rank, world_size, resume[0])
