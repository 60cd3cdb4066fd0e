"""Node failures on a real multi-node Ray cluster on one machine (issue #14, "Must show").

One cluster for the module: a head with no work resources (the driver's node) and worker raylets,
each `ray start --address=...` with its own --temp-dir: two rollout nodes ({rollout: 1} each) and a
learner node ({learner: 2}). Roles are pinned by those resources, so each runs on its own node. Tiny
async DDPO at S = 0 (every batch sampled with the latest weights), local-disk storage (one machine).

- Stop the node running rollout worker 0 mid-run: its batches go to the live worker, every epoch's
  batch is full, the run completes.
- Stop the learner node mid-run and start a replacement: Ray Train restarts the group there, the ranks
  restore the run's restart point, the driver rewinds its version to it, the run completes.
- S = 0, so neither fault may change the result: both runs end on the weights of an uninterrupted run
  of the same config, tensor for tensor.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _checkpoints import assert_same_weights  # noqa: E402
from _multinode import REPO, MultiNodeCluster  # noqa: E402
from _private_head import stop_group  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS = 5
OVERRIDES = [
    "rollout.num_workers=2", "rollout.resources={rollout: 1}", "rollout.placement_strategy=SPREAD",
    "rollout.max_restarts=2", "rollout.task_timeout_s=120", "learner.num_workers=2", "learner.resources={learner: 1}",
    "learner.max_failures=2", "learner.start_timeout_s=300", f"train.num_epochs={EPOCHS}", "train.batches_per_epoch=1",
    "train.max_staleness=0", "sampling.batch_size=2", "sampling.num_steps=3", "algorithm.train_batch_size=4",
    "output.checkpoint_every=1", "output.progress=false", "output.tensorboard=false", "output.image_grid_every=0",
    "output.experience_records=false", "train.verify_weights_every=1",
]


@pytest.fixture(scope="module")
def cluster():
    with MultiNodeCluster(name="rdfm") as c:
        c.rollout_nodes = [c.add_node(num_cpus=1, resources={"rollout": 1}) for _ in range(2)]
        c.learner_node = c.add_node(num_cpus=2, resources={"learner": 2})
        yield c


def _start(cluster, out: Path, model: str):
    # model: the session's built tiny model (workers building it at once into one cache would race)
    args = [sys.executable, str(Path(REPO) / "tests" / "_fault_driver.py"), str(out), "configs/tiny_ddpo_async.yaml",
            f"output.run_dir={out / 'run'}", f"model.path={model}", *OVERRIDES]
    return cluster.popen(args, str(out / "driver.log"))


def _wait_roles(proc, out: Path, timeout_s: float = 600) -> dict:
    deadline = time.time() + timeout_s
    while not (out / "roles.json").is_file():
        assert proc.poll() is None, (out / "driver.log").read_text()[-5000:]
        assert time.time() < deadline, "no epoch logged in time"
        time.sleep(0.5)
    return json.loads((out / "roles.json").read_text())


def _finish(proc, out: Path, timeout_s: float = 900) -> dict:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, (out / "driver.log").read_text()[-8000:]
    return json.loads((out / "result.json").read_text())


def _final_weights(out: Path) -> dict:
    import torch

    return torch.load(out / "final_weights.pt", weights_only=False)


def _rollout_nodes_back(cluster) -> None:
    """A rollout node stopped by an earlier test stays gone: give every rollout worker a node again."""
    alive = [n for n in cluster.nodes if n.resources.get("rollout")]
    cluster.rollout_nodes = alive + [cluster.add_node(num_cpus=1, resources={"rollout": 1}) for _ in range(2 - len(alive))]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, tiny_sd) -> dict:
    """The final weights of a fault-free run of the same config: what both fault runs must end on (S = 0)."""
    _rollout_nodes_back(cluster)
    out = tmp_path_factory.mktemp("uninterrupted")
    (out / "go").write_text("")  # no fault to wait for
    proc = _start(cluster, out, tiny_sd)
    try:
        result = _finish(proc, out)
    finally:
        if proc.poll() is None:
            stop_group(proc)
    assert result["learner_restarts"] == 0 and [r["step"] for r in result["rows"]] == list(range(EPOCHS))
    return _final_weights(out)


def _node_of(cluster, node_id):
    return next(n for n in cluster.nodes if n.node_id == node_id)


@pytest.fixture(scope="module")
def rollout_node_lost(cluster, tmp_path_factory, tiny_sd):
    out = tmp_path_factory.mktemp("rollout_lost")
    proc = _start(cluster, out, tiny_sd)
    try:
        roles = _wait_roles(proc, out)
        victim = _node_of(cluster, roles["rollout"][0])
        stop_group(victim.proc)  # the node, by its process group: raylet and every worker on it
        cluster.nodes.remove(victim)
        (out / "go").write_text("")  # the driver's next epoch runs only now (tests/_fault_driver.py)
        return roles, _finish(proc, out), _final_weights(out)
    finally:
        if proc.poll() is None:
            stop_group(proc)


def test_each_role_runs_on_its_own_node(cluster, rollout_node_lost):
    roles, _, _ = rollout_node_lost
    rollout_ids = {n.node_id for n in cluster.rollout_nodes}
    assert set(roles["rollout"]) == rollout_ids and len(set(roles["rollout"])) == 2  # one worker per rollout node
    assert set(roles["learner"]) == {cluster.learner_node.node_id}  # both ranks on the learner node
    workers = {n.node_id for n in cluster.nodes[1:]} | rollout_ids
    assert roles["driver"] not in workers  # the driver runs on the head, which has no work resources


def test_lost_rollout_node_every_batch_full(rollout_node_lost, uninterrupted):
    _, result, weights = rollout_node_lost
    rows = result["rows"]
    assert [r["step"] for r in rows] == list(range(EPOCHS))
    assert all(r["data/samples_per_epoch"] == 4 for r in rows)  # 2 workers x batch 2, every epoch
    assert all(r["policy/weights_consistent"] == 1 for r in rows)
    assert result["reissued"] >= 1 or rows[-1]["policy/reissued_batches"] >= 1
    assert_same_weights(weights, uninterrupted)  # the re-issued batches were sampled exactly as planned


def test_lost_learner_node_restarts_on_a_replacement_and_rewinds(cluster, tmp_path, tiny_sd, uninterrupted):
    _rollout_nodes_back(cluster)
    out = tmp_path / "learner_lost"
    out.mkdir()
    proc = _start(cluster, out, tiny_sd)
    try:
        _wait_roles(proc, out)
        rows_before = (out / "run" / "metrics.jsonl").read_text().count("\n")
        stop_group(cluster.learner_node.proc)
        cluster.nodes.remove(cluster.learner_node)
        cluster.learner_node = cluster.add_node(num_cpus=2, resources={"learner": 2})  # the replacement
        (out / "go").write_text("")  # the driver's next epoch runs only now (tests/_fault_driver.py)
        result = _finish(proc, out)
    finally:
        if proc.poll() is None:
            stop_group(proc)
    assert result["learner_restarts"] == 1 and len(result["rewinds"]) == 1, result
    rows = result["rows"]
    assert rows_before >= 1 and sorted({r["step"] for r in rows}) == list(range(EPOCHS))
    assert all(r["policy/version"] == r["step"] + 1 for r in rows)  # the driver's version was reset, then counted on
    assert all(r["policy/weights_consistent"] == 1 for r in rows) and rows[-1]["policy/learner_restarts"] == 1
    # S = 0: the rewound epochs re-ran exactly, so the run ends where an uninterrupted one does.
    assert_same_weights(_final_weights(out), uninterrupted)


def test_roles_that_never_fit_together_fail_at_start_naming_the_demand(cluster, tmp_path, tiny_sd):
    """The shipped async config with a third rollout worker on this cluster: every role fits alone, not all
    at once. The run fails at start (Ray Train would otherwise retry its worker group without end)."""
    cpus = sum(n.num_cpus for n in cluster.nodes)
    t0 = time.time()
    proc = cluster.popen([sys.executable, "-m", "raydiff.train", "configs/tiny_ddpo_async.yaml", f"output.run_dir={tmp_path}", f"model.path={tiny_sd}",
                          f"rollout.num_workers={int(cpus) - 1}", "learner.num_workers=2"], str(tmp_path / "train.log"))
    try:
        proc.wait(timeout=300)
    finally:
        stop_group(proc)
    elapsed = time.time() - t0
    log = (tmp_path / "train.log").read_text() + "".join(p.read_text(errors="replace") for p in tmp_path.glob("logs/*.log"))
    assert proc.returncode != 0, log[-3000:]
    assert "FeasibilityError" in log and f"rollout {{CPU: {int(cpus) - 1}}}" in log and "learner {CPU: 2}" in log, log[-3000:]
    assert f"the cluster's total is {{CPU: {int(cpus)}," in log, log[-3000:]
    print(f"infeasible run failed after {elapsed:.1f} s (driver start included)")
    assert elapsed < 120  # within a minute on an idle machine; this one is shared
