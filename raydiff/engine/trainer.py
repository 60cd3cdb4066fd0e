"""The driver: rollouts run ahead of the learner by at most `train.max_staleness` versions.

Epoch e trains on batches sampled with policy version ≥ e − S. At the top of
epoch e (version e published), the driver dispatches sampling for epochs up to
e + S; weight updates are queued on each rollout actor behind the batches it
already has, so S = 0 is exactly the synchronous algorithm and S > 0 overlaps
sampling with learning. The driver never branches on the algorithm.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from raydiff.algorithms.registry import make_algorithm
from raydiff.config import RunConfig, to_yaml
from raydiff.console import epoch_summary, fmt
from raydiff.engine import checkpoint as ckpt
from raydiff.engine.buffer import StalenessGate
from raydiff.engine.datapath import EpochBatch, RolloutBatch, TrajectoriesLost, fetch_images, fetch_whole, payload_bytes
from raydiff.engine.groups import EpochPlan, check_group_layout, plan_epoch
from raydiff.engine.learners.coordinator import LearnerRestarted
from raydiff.engine.learners.handle import LearnerHandle
from raydiff.engine.metrics import MetricsLogger
from raydiff.engine.records import ExperienceWriter
from raydiff.engine.rollouts.group import RolloutFailed, RolloutGroup
from raydiff.engine.storage import Storage, check_reachable, join_uri, run_location
from raydiff.prompts import load_prompts
from raydiff.types import PromptBatch, Trajectory

log = logging.getLogger("raydiff.trainer")


def join_address(cfg: RunConfig) -> str | None:
    """The cluster a run joins: cfg.ray_address, else RAY_ADDRESS (set by `ray job submit`); None = embedded."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(cfg: RunConfig) -> None:
    """Join `join_address(cfg)` if given, else start an embedded local cluster sized for the job.

    Embedded mode passes address="local": Ray would otherwise join whatever cluster it finds in
    /tmp/ray/ray_current_cluster (a `ray start` on this machine, even a dead one) and then refuse
    num_cpus ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").
    """
    from raydiff import console

    if ray.is_initialized():
        return
    address = join_address(cfg)
    quiet = console.ray_init_kwargs()
    if address:
        # Joining: the cluster (or `ray job submit --runtime-env-json`) owns the runtime env.
        ray.init(address=address, log_to_driver=True, **quiet)
    else:
        env_vars = console.worker_env(console.is_verbose())
        if os.environ.get("RAYDIFF_CACHE"):
            env_vars["RAYDIFF_CACHE"] = os.environ["RAYDIFF_CACHE"]
        demand = cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.learner.num_workers * cfg.learner.num_cpus + 1
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(np.ceil(demand))), include_dashboard=False,
                 runtime_env={"env_vars": env_vars} if env_vars else None, **quiet)
    console.after_ray_init()


def group_wise_components(reward_cfg) -> list[str]:
    """Names of the reward components whose score depends on the rest of the group (e.g. win_rate)."""
    from raydiff.rewards.base import reward_class

    return [c.name for c in reward_cfg.components if getattr(reward_class(c.registry_name), "group_wise", False)]


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        # Every durable artefact goes to run storage (a shared dir or a URI), resolved here on the
        # driver: workers run in other working dirs, on other nodes. Local disk is scratch only.
        self.storage = Storage(run_location(cfg))
        self.run_dir = self.storage.locate("")
        self.prompts = load_prompts(cfg.prompts.source, cfg.prompts.column, cfg.prompts.limit)
        self.algorithm = make_algorithm(cfg.algorithm, cfg.sampling)
        self.gate = StalenessGate(cfg.train.max_staleness, cfg.train.stale_policy, cfg.train.stale_weight)
        self.start_epoch = 0
        self.is_async = self.algorithm.needs.mode == "async"
        self.group_size = self.algorithm.needs.samples_per_prompt
        check_group_layout(self.group_size, cfg.sampling.batch_size, cfg.rollout.num_workers, cfg.train.batches_per_epoch,
                           group_wise_components(cfg.reward))
        self.learner_restarts = 0
        self.rewinds: list = []  # checkpoints the run was rewound to after learner restarts
        self.restored_checksums: set = set()  # what the restarted ranks reported holding (last restart)

    # --- setup -------------------------------------------------------------
    def _start_roles(self) -> None:
        from raydiff.engine.cluster.placement import check_feasible, role_bundles
        from raydiff.engine.cluster.plan import check_memory

        cfg = self.cfg
        # Fail at once, naming the knob, if a GPU role is predicted to run out of memory,
        check_memory(cfg, self.algorithm.needs)
        # and, naming the role and the fix, if no node type could ever hold an ask.
        check_feasible("learner", role_bundles(cfg.learner))
        if self.is_async:
            check_feasible("rollout", role_bundles(cfg.rollout))
        # and, naming each role's demand and the cluster's total, if they never fit all at once.
        from raydiff.engine.cluster.feasibility import check_run_fits, run_demands

        check_run_fits(run_demands(cfg, self.is_async))
        if cfg.reward.backend == "serve":
            from raydiff.rewards.client import ensure_reward_service

            self.reward_service = ensure_reward_service(cfg.reward.components, cfg.reward.serve_app, cfg.reward.reuse)
        if cfg.learner.engine == "deepspeed":
            from raydiff.engine.learners.distributed import GroupLearnerHandle

            self.learner = GroupLearnerHandle(cfg, self.storage.uri)
        elif cfg.learner.num_workers != 1:
            raise ValueError(f"learner.num_workers={cfg.learner.num_workers} needs learner.engine=deepspeed (engine=torch is one process)")
        else:
            self.learner = LearnerHandle(cfg)
        # Sync algorithms sample inside the learner; rollout actors exist only for async ones.
        self.rollouts = RolloutGroup(cfg, self.algorithm.needs) if self.is_async else None
        # Fail now, not at the first checkpoint, if some node cannot reach run storage.
        readers = {"learner": self.learner.probe_storage}
        if self.rollouts:
            readers["rollout"] = self.rollouts.probe_storage
        try:
            check_reachable(self.storage, readers)
        except BaseException:
            if self.rollouts:
                self.rollouts.shutdown()
            self.learner.shutdown()
            raise

    def _resume(self) -> None:
        found = ckpt.resolve_resume(self.cfg.output.resume, self.storage)
        if found is None:
            return
        state = ckpt.load_driver_state(found)
        self.learner.load(ckpt.learner_uri(found))
        self.algorithm.load_state_dict(state["algorithm"])
        gate = state.get("gate", {})  # counters behind the policy/ metrics, so they continue
        self.gate.histogram.update(gate.get("histogram", {}))
        self.gate.dropped = gate.get("dropped", 0)
        self.start_epoch = state["epoch"] + 1
        log.info("resumed from %s at epoch %d", found, self.start_epoch)

    # --- data --------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> EpochPlan:
        """Requests and group ids of `epoch`: a pure function of (train.seed, epoch), so a re-issue or resume repeats it."""
        c = self.cfg
        return plan_epoch(self.prompts, c.train.seed, epoch, c.train.batches_per_epoch, c.rollout.num_workers,
                          c.sampling.batch_size, self.group_size)

    def batch_requests(self, epoch: int) -> list[tuple[int, list[str], int]]:
        """(worker, prompts, seed) for every rollout batch of `epoch` (groups of k per prompt when the algorithm asks)."""
        return self.epoch_plan(epoch).requests

    def _collect(self, epoch: int, version: int) -> list[RolloutBatch]:
        """The epoch's batches (metadata fetched, tensors as refs), each admitted by the staleness gate."""
        plan = self.epoch_plan(epoch)
        return [self._admit(request, group_ids, batch, version)
                for request, group_ids, batch in zip(plan.requests, plan.group_ids, self.rollouts.gather(epoch))]

    def _admit(self, request, group_ids, batch: RolloutBatch, version: int) -> RolloutBatch:
        while self.gate.admit(batch.meta, version) is None:  # too stale: sample again with the current weights (same request: groups stay whole)
            batch = self.rollouts.regenerate(request, batch.offset)
        batch.meta.group_ids = torch.as_tensor(group_ids, dtype=torch.int64)
        return batch

    def _train_on(self, epoch: int, batches: list[RolloutBatch], version: int) -> tuple[Trajectory, dict]:
        """algorithm.prepare on the metadata, then the learner ranks fetch the tensors themselves. Batches whose
        tensors a rank could not fetch are re-sampled and the epoch prepared again from the same algorithm state."""
        state = copy.deepcopy(self.algorithm.state_dict())
        plan = self.epoch_plan(epoch)
        for attempt in range(self.cfg.rollout.max_batch_retries + 1):
            meta = self.algorithm.prepare(Trajectory.cat([b.meta for b in batches]))  # a fresh copy on every attempt
            try:
                return meta, self.learner.train(EpochBatch(meta, batches, self.cfg.rollout.task_timeout_s))
            except TrajectoriesLost as lost:
                if attempt == self.cfg.rollout.max_batch_retries:
                    raise RolloutFailed(f"{lost}; still lost after rollout.max_batch_retries={attempt} re-samples") from lost
                log.warning("%s", lost)
                self.algorithm.load_state_dict(copy.deepcopy(state))
                for i in lost.batches:
                    # regenerate counts it in policy/reissued_batches
                    self.gate.retract(batches[i].meta)
                    batches[i] = self._admit(plan.requests[i], plan.group_ids[i], self.rollouts.regenerate(plan.requests[i], batches[i].offset), version)
        raise AssertionError("unreachable")

    # --- loop --------------------------------------------------------------
    def run(self) -> Path | str:
        """Train; a reward app this run deployed is deleted however the run ends (done, error, Ctrl-C)."""
        try:
            return self._run()
        finally:
            if getattr(self, "reward_service", None) is not None:
                self.reward_service.delete_owned_app()

    def _run(self) -> Path | str:
        cfg = self.cfg
        self.storage.write_bytes("config.yaml", to_yaml(cfg).encode())
        self._start_roles()
        self._resume()
        logger = MetricsLogger(self.storage, cfg.output.tensorboard, resume_step=self.start_epoch - 1 if self.start_epoch else None)
        self.records = ExperienceWriter(self.storage, self.start_epoch, cfg.output.record_tensors) if (self.is_async and cfg.output.experience_records) else None
        if self.start_epoch == 0 and self._restartable():
            self.save(-1)  # the initial state: a learner restart before the first checkpoint rewinds here
        if self.rollouts:
            self.rollouts.push_weights(self.learner.publish())
        bar = tqdm(total=cfg.train.num_epochs, initial=self.start_epoch, desc="epochs", disable=not cfg.output.progress)
        epoch = self.start_epoch
        try:
            while epoch < cfg.train.num_epochs:
                try:
                    self._epoch(epoch, logger, bar)
                except LearnerRestarted as restarted:
                    epoch = self._rewind(restarted)
                    continue
                epoch += 1
                bar.update(1)
        finally:
            logger.close()
            if self.records:
                self.records.close()
            if self.rollouts:
                self.rollouts.shutdown()
            self.learner.shutdown()
        return self.run_dir

    def _epoch(self, epoch: int, logger, bar) -> None:
        """One epoch: train, verify, log, checkpoint."""
        cfg = self.cfg
        metrics, images, captions = self.train_epoch(epoch) if self.is_async else self.train_epoch_sync(epoch)
        if cfg.train.verify_weights_every and (epoch + 1) % cfg.train.verify_weights_every == 0:
            metrics["policy/weights_consistent"] = self.verify_weights()
        metrics["policy/learner_restarts"] = self.learner_restarts
        logger.log(epoch, metrics)
        bar.set_postfix(reward=fmt(metrics.get("reward/mean")))
        bar.write(epoch_summary(epoch, cfg.train.num_epochs, metrics))
        if cfg.output.image_grid_every and epoch % cfg.output.image_grid_every == 0 and images is not None:
            logger.log_images(epoch, images[:16], captions[:16])
        last = epoch == cfg.train.num_epochs - 1
        if last or (cfg.output.checkpoint_every and (epoch + 1) % cfg.output.checkpoint_every == 0):
            self.save(epoch)

    def _restartable(self) -> bool:
        """The learner can be restarted behind the driver's back (Ray Train max_failures > 0)."""
        return hasattr(self.learner, "restart_point") and self.cfg.learner.max_failures > 0

    def _rewind(self, restarted: "LearnerRestarted") -> int:
        """The learner group restarted from its restart point: reset the driver to the same checkpoint
        (policy version, algorithm state, epoch), drop batches in flight, resend the restored weights.
        Returns the epoch to continue from. No silent rollback: the learner never trains on past the
        driver's state."""
        point = self.learner.restart_point
        if point is None:
            raise RuntimeError(f"{restarted}, but this run has no checkpoint to rewind to") from restarted
        found = ckpt.checkpoint_of(point)
        state = ckpt.load_driver_state(found)
        for attempt in range(self.cfg.learner.max_failures + 1):
            try:
                self.learner.load(point)  # every rank on exactly that checkpoint, whatever it restored
                break
            except LearnerRestarted:  # restarted again while loading: load again
                if attempt == self.cfg.learner.max_failures:
                    raise
        self.algorithm.load_state_dict(state["algorithm"])
        self.learner_restarts += 1
        self.rewinds.append(found)
        self.restored_checksums = {v.get("checksum") for v in restarted.restored.values()}
        log.warning("%s: rewound the run to %s (epoch %d, policy version %d)", restarted, found, state["epoch"] + 1, self.learner.version)
        if self.rollouts:
            self.rollouts.reset()
            self.rollouts.push_weights(self.learner.publish(), rewind=True)
        return state["epoch"] + 1

    def train_epoch(self, epoch: int):
        """Async algorithms: collect (dispatching up to S epochs ahead), prepare, learn, publish."""
        cfg, t0 = self.cfg, time.perf_counter()
        S = cfg.train.max_staleness
        for ahead in range(epoch, min(epoch + S, cfg.train.num_epochs - 1) + 1):
            self.rollouts.dispatch(ahead, self.batch_requests(ahead))
        version = self.learner.version
        batches = self._collect(epoch, version)
        t_wait = time.perf_counter() - t0
        batch, train_metrics = self._train_on(epoch, batches, version)  # `batch`: the prepared metadata
        staleness = version - batch.version
        via_driver = sum(payload_bytes(b.meta) for b in batches)  # what the driver fetched (metadata; images below)
        images = None
        if cfg.output.image_grid_every and epoch % cfg.output.image_grid_every == 0:
            images = fetch_images(batches, 16, cfg.rollout.task_timeout_s)
            via_driver += payload_bytes(images)
        records_batch = batch
        if self.records and self.records.keep_tensors:  # output.record_tensors: the driver fetches the tensors too
            whole = Trajectory.cat([fetch_whole(b, cfg.rollout.task_timeout_s) for b in batches])
            records_batch = replace(batch, latents=whole.latents, log_probs=whole.log_probs)
            via_driver += payload_bytes([records_batch.latents, records_batch.log_probs])
        t_sync = time.perf_counter()
        swaps = self.rollouts.push_weights(self.learner.publish())
        if S == 0:  # publish -> every rollout worker swapped; the next batch waits for it anyway
            try:
                ray.get(swaps)
            except ray.exceptions.RayError:  # a lost worker gets the latest weights when its batch is re-issued
                pass
        t_sync = time.perf_counter() - t_sync  # S > 0: publish + enqueue (the swap waits behind batches in flight)
        metrics = self._epoch_metrics(batch, train_metrics, staleness, t_wait, t_sync, time.perf_counter() - t0)
        metrics["data/bytes_via_driver"] = via_driver
        if self.records:
            self.records.write(epoch, records_batch, self.learner.version - 1, {"rollout_wait_s": t_wait, "learner_step_s": train_metrics.get("time/learner_step_s", 0.0), "sync_s": t_sync})
        return metrics, images, batch.prompts

    def train_epoch_sync(self, epoch: int):
        """Sync algorithms: the learner samples with gradients from a prompt batch and reports its own rewards."""
        t0 = time.perf_counter()
        prompts = [p for _, ps, _ in self.batch_requests(epoch) for p in ps]
        seed = int(np.random.default_rng([self.cfg.train.seed, epoch, 7]).integers(0, 2**31 - 1))
        metrics = self.learner.train(PromptBatch(prompts, seed, self.learner.version))
        images = metrics.pop("images", None)
        metrics.update({"policy/version": self.learner.version, "time/epoch_s": time.perf_counter() - t0,
                        "throughput/samples_per_s": len(prompts) / max(time.perf_counter() - t0, 1e-9)})
        return metrics, images, prompts
    def verify_weights(self) -> int:
        """Learner ranks and rollout workers must hold the published weights bit for bit; raise otherwise."""
        from raydiff.models.lora import state_checksum

        update = ray.get(self.learner.publish())
        expected = update["checksum"]
        assert state_checksum(update["state"]) == expected
        problems = []
        for rank, c in enumerate(self.learner.checksums()):
            if c != expected:
                problems.append(f"learner rank {rank} differs")
        if self.rollouts:
            for i, got in enumerate(self.rollouts.checksums()):
                if got is None:  # down (node lost): it is given the latest weights before it samples again
                    continue
                version, c = got
                if c != expected:
                    problems.append(f"rollout worker {i} (v{version}) differs")
        if problems:
            raise RuntimeError("weights diverged: " + "; ".join(problems))
        return 1

    def save(self, epoch: int) -> Path | str:
        """Learner ranks upload their shards, the driver its state; the manifest goes last (checkpoint.py)."""
        def write(step: Storage) -> dict:
            files = {f"learner/{k}": v for k, v in self.learner.save(join_uri(step.uri, "learner")).items()}
            files.update(ckpt.save_driver_state(step, {"epoch": epoch, "algorithm": self.algorithm.state_dict(),
                                                       "version": self.learner.version, "gate": {"histogram": dict(self.gate.histogram), "dropped": self.gate.dropped}}))
            files.update(ckpt.write_file(step, "config.yaml", to_yaml(self.cfg).encode()))
            return files

        path = ckpt.save_checkpoint(self.storage, epoch, write)
        if hasattr(self.learner, "mark_complete"):
            self.learner.mark_complete(ckpt.learner_uri(path))
        return path

    def _epoch_metrics(self, batch, train_metrics, staleness, t_wait, t_sync, t_epoch) -> dict:
        r = np.asarray(batch.rewards, np.float64)
        m = {"reward/mean": r.mean(), "reward/std": r.std(), "reward/min": r.min(), "reward/max": r.max()}
        for name, vals in batch.reward_components.items():
            m[f"reward/{name}"] = float(np.mean(vals))
        m.update(train_metrics)
        m.update({
            "policy/version": self.learner.version, "policy/staleness": staleness, "policy/dropped_batches": self.gate.dropped,
            "policy/reissued_batches": self.rollouts.reissued,
            **{f"policy/staleness_hist_{k}": v for k, v in sorted(self.gate.histogram.items())},
            "reward/calls_per_batch": batch.timings.get("reward_calls", 1) / max(1, self.cfg.train.batches_per_epoch * self.cfg.rollout.num_workers),
            "time/rollout_wait_s": t_wait, "time/sync_s": t_sync, "time/epoch_s": t_epoch,
            "time/sample_s": batch.timings.get("sample_s", 0.0), "time/reward_s": batch.timings.get("reward_s", 0.0),
            "time/reward_wait_s": batch.timings.get("reward_wait_s", 0.0),  # rollouts blocked on scores (GPU idle), summed
            "reward/round_trips": batch.timings.get("reward_calls", 0),  # reward-service calls made for this epoch's batches
            "throughput/samples_per_s": len(batch) / max(t_epoch, 1e-9),
            "data/samples_per_epoch": len(batch),
        })
        return m
