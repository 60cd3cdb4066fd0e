"""Faults are the cluster's, not the run's (issue #14 point 4), on the session's real local Ray cluster.

- A rollout task error (a reward-service error, CUDA OOM, ...) re-issues the batch; the batch comes back
  full. Errors that persist stop the run after rollout.max_batch_retries with a clear message.
- A learner task that never returns fails with a timeout naming the role and learner.task_timeout_s.
- Roles that each fit the cluster but not all together fail at start, naming each role's demand and the
  cluster's total (instead of Ray Train retrying its worker group forever).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle

from raydiff.algorithms.registry import make_algorithm
from raydiff.config import LearnerSection, load_config
from raydiff.engine.rollouts.worker import RolloutWorker

ROOT = Path(__file__).resolve().parents[1]
ASYNC = str(ROOT / "configs" / "tiny_ddpo_async.yaml")
# Ray workers cannot import pytest's test modules by name: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailsFirstStart(RolloutWorker):
    """A worker whose first batch fails inside the task (as a reward-service 500 or a CUDA OOM would)."""

    failed = False

    def start(self, prompts, seed):
        if not self.failed:
            self.failed = True
            raise RuntimeError("reward service answered 500")
        return super().start(prompts, seed)


def _tiny_rollout_cfg(tiny_sd, *extra):
    return load_config(ASYNC, [f"model.path={tiny_sd}", "rollout.num_workers=1", "sampling.num_steps=2",
                               "sampling.batch_size=2", *extra])


def test_rollout_task_error_reissues_the_batch(ray_cluster, tiny_sd):
    from raydiff.engine.rollouts.group import RolloutGroup

    cfg = _tiny_rollout_cfg(tiny_sd)
    group = RolloutGroup(cfg, make_algorithm(cfg.algorithm, cfg.sampling).needs, worker_cls=FailsFirstStart)
    try:
        group.dispatch(0, [(0, ["a cat", "a dog"], 7), (0, ["a cow", "a fox"], 8)])
        batches = [b.meta for b in group.gather(0)]  # metadata on the driver (engine/datapath.py)
        assert [b.prompts for b in batches] == [["a cat", "a dog"], ["a cow", "a fox"]]  # every batch full, in order
        assert all(b.rewards is not None and len(b.rewards) == 2 for b in batches)
        assert group.reissued == 1
    finally:
        group.shutdown()


class HangsOnDemand:
    """A learner worker whose "hang" task does not return for a long time (a wedged collective, a stuck GPU)."""

    def __init__(self, rank, world_size):
        self.rank = rank

    def run_task(self, task):
        if task == "hang":
            time.sleep(10)
        return task


def test_learner_task_that_never_returns_times_out_naming_the_role(ray_cluster, tmp_path):
    from raydiff.engine.learners.group import LearnerGroup, LearnerTimeout

    group = LearnerGroup(HangsOnDemand, LearnerSection(num_workers=1, num_cpus=1, task_timeout_s=3),
                         storage_path=str(tmp_path), name="hangs").start().wait_ready(300)
    try:
        assert group.run(["ok"]) == ["ok"]
        t0 = time.monotonic()
        with pytest.raises(LearnerTimeout, match=r"learner group 'hangs'.*'hang'.*did not finish within 3 s.*learner\.task_timeout_s"):
            group.run(["hang"])
        assert time.monotonic() - t0 < 15
    finally:
        group.shutdown()


def test_roles_that_fit_alone_but_not_together_fail_at_start(ray_cluster):
    from raydiff.engine.cluster.feasibility import FeasibilityError, check_run_fits, run_demands
    from raydiff.engine.cluster.placement import check_feasible, role_bundles

    total_cpus = ray_cluster.cluster_resources()["CPU"]
    n = int(total_cpus // 2) + 1  # each role alone fits; together they need 2n > total
    cfg = load_config(ASYNC, [f"rollout.num_workers={n}", f"learner.num_workers={n}"])
    check_feasible("rollout", role_bundles(cfg.rollout))
    check_feasible("learner", role_bundles(cfg.learner))
    demands = run_demands(cfg, is_async=True)
    assert demands == {"learner": {"CPU": n}, "rollout": {"CPU": n}}
    with pytest.raises(FeasibilityError) as info:
        check_run_fits(demands)
    msg = str(info.value)
    assert f"learner {{CPU: {n}}}" in msg and f"rollout {{CPU: {n}}}" in msg and f"CPU: {int(total_cpus)}" in msg
    assert "rollout.num_workers" in msg and "learner.num_workers" in msg
    # An autoscaler that may add a 4-CPU node makes it feasible; one with unbounded node types cannot be refused.
    assert check_run_fits(demands, node_types=[{"name": "cpu4", "resources": {"CPU": 4}, "max_workers": 1}])["CPU"] == total_cpus + 4
    assert check_run_fits(demands, node_types=[{"name": "cpu4", "resources": {"CPU": 4}, "max_workers": None}]) == {}
    assert check_run_fits(run_demands(cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_workers": 1})}), True))
