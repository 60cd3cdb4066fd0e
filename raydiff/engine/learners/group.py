"""LearnerGroup: data-parallel learner workers inside one Ray Train `TorchTrainer` run.

Ray Train owns the workers (placement, process group, restarts); the driver
cannot call methods on them, so the group uses a pull model through a small
coordinator actor::

    driver                         coordinator actor              Train worker rank r
    ------                         -----------------              -------------------
    start(): fit() in a thread ──────────────────────────────────► make_worker(r, W)
                                                                   load(latest ckpt)?
    run([t0..tW-1]) ─► put_task ─► pending = (seq, tasks) ◄─ get_task(r, last_seq)
                                                                   worker.run_task(t_r)
                       get_results(seq) ◄─ results[r] ◄──────────── put_result(r, seq, res)
    checkpoint()    ─► put_task(CHECKPOINT) ...........► worker.save(tmp); ray.train.report(ckpt)
    shutdown()      ─► stop() ──────────────────────────────────► loop returns; fit() ends

Invariants: one task batch is in flight at a time, and every rank runs every
batch in the same order (the worker's collectives depend on it). After a
worker-group failure, Ray Train restarts all workers (FailureConfig.max_failures);
each restores its checkpoint, and before serving any task the ranks compare
weight checksums (all-gather): a rank that differs fails the start, so Ray Train
tries again. The restart is never silent: the batch in flight is dropped (not
re-run on rolled-back weights) and `run` raises `LearnerRestarted`, so the
driver resets its own state (policy version, algorithm state, epoch) to the
same checkpoint. The coordinator is CPU-free, lives on the driver's node when
it can, and restarts (max_restarts); a coordinator restart also raises
`LearnerRestarted` (its task board was lost). Every wait has a timeout whose
error names the role and the knob. Tasks and results are opaque: the group
knows no algorithm.

Ray 2.60 runs Train v2 by default (RAY_TRAIN_V2_ENABLED=1); this module uses only
APIs common to v1 and v2 (`ray.train.report/get_checkpoint/get_context`).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Optional

import ray

from raydiff.engine.learners.coordinator import (  # noqa: F401
    _REREGISTER,
    _STOP,
    CHECKPOINT,
    CONTROL_TIMEOUT_S,
    Coordinator,
    LearnerRestarted,
    LearnerTimeout,
)


def _train_loop(config: dict) -> None:
    """`train_loop_per_worker`: build the learner, restore, then serve tasks until stopped."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # DeepSpeed reads these for device placement; Ray Train sets MASTER_* and the
    # process group itself but not always RANK/LOCAL_RANK in the environment.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(ctx.get_local_world_size()))
    if config.get("torch_threads"):
        import torch

        torch.set_num_threads(int(config["torch_threads"]))
    coord = config["coordinator"]
    worker = config["make_worker"](rank, world)
    restored = getattr(worker, "restored_from", None)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            worker.load(d)
        restored = ckpt.path
    info = {"restored": restored, "checksum": agree_on_weights(worker, rank, world), "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id()}
    token = uuid.uuid4().hex
    incarnation = ray.get(coord.register.remote(rank, token, info))
    last_seq = -1
    while True:
        got = ray.get(coord.get_task.remote(rank, last_seq, 10.0, incarnation))
        if got is None:
            continue
        seq, task = got
        if task == _STOP:
            return
        if task == _REREGISTER:  # the coordinator restarted empty: announce again, count from -1
            incarnation, last_seq = ray.get(coord.register.remote(rank, token, info)), -1
            continue
        if isinstance(task, tuple) and task and task[0] == CHECKPOINT:
            result = _save_and_report(worker, name=task[1])
        else:
            result = worker.run_task(task)
        ray.get(coord.put_result.remote(rank, seq, result, token))
        last_seq = seq


def agree_on_weights(worker, rank: int, world: int) -> Optional[str]:
    """Before the first task: every rank's weight checksum (worker.checksum(), if it has one) must be
    rank 0's. Raises on a mismatch, so Ray Train restarts the group instead of letting ranks that
    silently diverged train on. Returns the agreed checksum (None if the worker has no checksum())."""
    if not hasattr(worker, "checksum"):
        return None
    mine = worker.checksum()
    if world == 1:
        return mine
    import torch.distributed as dist

    every = [None] * world
    dist.all_gather_object(every, mine)
    if any(c != every[0] for c in every):
        raise RuntimeError(f"learner ranks hold different weights after (re)start: {[str(c)[:12] for c in every]}")
    return mine


def _save_and_report(worker, name: str) -> str:
    """Every rank saves into its own temp dir; Ray Train merges them into one checkpoint dir."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="raydiff-ckpt-") as d:
        worker.save(d)
        ray.train.report({"checkpoint": name}, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    # Train v2 registers a report only when its controller next polls the workers
    # (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a crash before that would
    # restart from the previous checkpoint. Wait until it is committed, so a
    # checkpoint() that returned is the one restarts resume from.
    reported = ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
    return reported[-1].checkpoint.path if reported else name


def _train_storage(uri: str) -> dict:
    """Ray Train's storage_path (+ storage_filesystem for URIs with query options such as an endpoint)."""
    from raydiff.engine.storage import Storage

    store = Storage(uri)
    return {"storage_path": store.path()} if store.is_local else {"storage_path": store.path(), "storage_filesystem": store.fs}


class LearnerGroup:
    """Driver-side handle: `start()`, `run(tasks) -> results`, `checkpoint(name)`, `shutdown()`.

    make_worker(rank, world_size) must be picklable and return an object with
    `run_task(task) -> result`, `save(dir)` and `load(dir)`; it runs inside each
    Train worker, after Ray Train has set up torch.distributed (gloo on CPU,
    NCCL with use_gpu).
    """

    def __init__(self, make_worker: Callable[[int, int], Any], learner_cfg, storage_path: str,
                 name: str = "learner", max_failures: int = 0, task_timeout_s: Optional[float] = None):
        self.make_worker = make_worker
        self.cfg = learner_cfg
        self.storage_path = storage_path  # a local path (made absolute) or a run-storage URI
        self.name = name
        self.max_failures = max_failures
        self.task_timeout_s = task_timeout_s if task_timeout_s is not None else getattr(learner_cfg, "task_timeout_s", None)
        self.num_workers = int(learner_cfg.num_workers)
        self.coordinator = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._fit_result = None
        self._seen: Optional[tuple] = None  # (coordinator incarnation, generation) of the last results

    def start(self) -> "LearnerGroup":
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # CPU-free, so it never competes with the roles; on the driver's node (soft), so it lives as
        # long as the driver; restartable, with calls retried on the new instance (run() notices).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.coordinator = Coordinator.options(name=f"coordinator-{self.name}-{uuid.uuid4().hex[:6]}", max_restarts=-1,
                                               max_task_retries=-1, scheduling_strategy=here).remote(self.num_workers)
        resources = {"CPU": float(self.cfg.num_cpus), **{k: float(v) for k, v in self.cfg.resources.items()}}
        if self.cfg.use_gpu:
            resources["GPU"] = 1.0
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"coordinator": self.coordinator, "make_worker": self.make_worker,
                               "torch_threads": None if self.cfg.use_gpu else self.cfg.torch_threads},
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=self.cfg.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=self.name, **_train_storage(self.storage_path),
                                 failure_config=FailureConfig(max_failures=self.max_failures)),
        )

        def fit():
            try:
                self._fit_result = trainer.fit()
            except BaseException as e:  # surfaced by run()/shutdown() on the driver thread
                self._error = e

        self._thread = threading.Thread(target=fit, name=f"raydiff-{self.name}-fit", daemon=True)
        self._thread.start()
        return self

    def _check_alive(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"learner group {self.name!r} failed: {type(self._error).__name__}: {self._error}") from self._error
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"learner group {self.name!r} is not running (start() not called, or fit() returned)")

    def wait_ready(self, timeout_s: float) -> "LearnerGroup":
        """Block until every rank has registered (restored, weights agreed), or fail naming the demand.

        Ray Train retries a worker group that cannot be placed without end; this is the bound
        (an autoscaler that should add the nodes gets `timeout_s`)."""
        self._wait_registered(timeout_s)
        return self

    def _call(self, ref, what: str):
        """ray.get on a coordinator call, bounded: a coordinator that never answers is an error, not a hang."""
        try:
            return ray.get(ref, timeout=CONTROL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise LearnerTimeout(f"learner group {self.name!r}: the coordinator did not answer {what} within {CONTROL_TIMEOUT_S:g} s") from None

    def _restarted(self, status: dict, generation: int) -> Optional[LearnerRestarted]:
        seen = (status["incarnation"], generation)
        if self._seen is None:
            self._seen = seen
        if seen == self._seen:
            return None
        self._seen = seen
        status = self._wait_registered(getattr(self.cfg, "start_timeout_s", 900.0))
        return LearnerRestarted(self.name, generation, status["restored"])

    def _wait_registered(self, timeout_s: float) -> dict:
        """The coordinator's status once every rank of the current generation has registered (so what
        they restored is known and agreed), or LearnerTimeout naming learner.start_timeout_s."""
        t0 = time.monotonic()
        while True:
            self._check_alive()
            status = self._call(self.coordinator.status.remote(), "status")
            if status["ready"]:
                return status
            if time.monotonic() - t0 > timeout_s:
                ask = {"CPU": self.cfg.num_cpus, **({"GPU": 1} if self.cfg.use_gpu else {}), **self.cfg.resources}
                started = sum(v["generation"] == status["generation"] for v in status["restored"].values())
                raise LearnerTimeout(
                    f"learner group {self.name!r}: {started} of {self.num_workers} learner ranks started "
                    f"within learner.start_timeout_s={timeout_s:g} s (each asks {ask}); the cluster cannot place them now "
                    f"(see `ray status`): free or add resources, lower learner.num_workers, or raise learner.start_timeout_s")
            time.sleep(0.2)

    def run(self, task_per_rank: list) -> list:
        """Give tasks[r] to rank r; block until every rank returns; results in rank order.

        Raises LearnerRestarted if the workers (or the coordinator) restarted since the last results
        (the batch is then dropped: re-running it on restored weights would be a silent rollback),
        and LearnerTimeout, naming `learner.task_timeout_s`, if the batch takes longer than that.
        """
        self._check_alive()
        status = self._call(self.coordinator.status.remote(), "status")
        seq = self._call(self.coordinator.put_task.remote(list(task_per_rank)), "put_task")
        t0 = time.monotonic()
        while True:
            got = self._call(self.coordinator.get_results.remote(seq, 1.0), "get_results")
            if got is not None:
                kind, generation, results = got
                status = self._call(self.coordinator.status.remote(), "status")
                restarted = self._restarted(status, generation)
                if restarted is not None or kind == "aborted":
                    raise restarted or LearnerRestarted(self.name, generation, status["restored"])
                return results
            self._check_alive()
            now = self._call(self.coordinator.status.remote(), "status")
            if now["incarnation"] != status["incarnation"]:  # the coordinator restarted: this batch is gone
                raise self._restarted(now, now["generation"]) or LearnerRestarted(self.name, now["generation"], now["restored"])
            if self.task_timeout_s is not None and time.monotonic() - t0 > self.task_timeout_s:
                raise LearnerTimeout(
                    f"learner group {self.name!r}: task batch {seq} ({_describe(task_per_rank)}) did not finish within "
                    f"{self.task_timeout_s:g} s on {self.num_workers} learner rank(s); raise learner.task_timeout_s if "
                    "steps are this slow, else look for a hung rank (its worker log)")

    def checkpoint(self, name: str) -> str:
        """All ranks `save` into one Ray Train checkpoint `name` (unique per run); returns its directory.

        Returns once Ray Train has committed it: a restart after this resumes from it.
        """
        return self.run([(CHECKPOINT, name)] * self.num_workers)[0]

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Stop the workers, wait for fit() to return, drop the coordinator; re-raises a fit() error."""
        if self.coordinator is not None:
            try:
                ray.get(self.coordinator.stop.remote(), timeout=CONTROL_TIMEOUT_S)
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.coordinator is not None:
            ray.kill(self.coordinator, no_restart=True)
            self.coordinator = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"learner group {self.name!r} failed: {err}") from err


def _describe(tasks: list) -> str:
    """A short name for a task batch in errors: its first element's kind."""
    t = tasks[0] if tasks else None
    if isinstance(t, tuple) and t:
        return repr(t[0])
    if isinstance(t, dict):
        return repr(t.get("op", sorted(t)[:1]))
    if isinstance(t, str):
        return repr(t[:40])
    return type(t).__name__
