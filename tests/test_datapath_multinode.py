"""The data path on a real multi-node Ray cluster on one machine (issue #14 point 5).

Head (the driver's node, no work resources), a rollout node ({rollout: 1}) and a learner node
({learner: 1}), each its own `ray start` raylet with its own --temp-dir. The batch's tensor piece
(> 100 KB, so it lives in the rollout node's object store, not inline in the driver) goes from the
rollout node to the learner node; the driver fetches only the metadata. Then the rollout node is
stopped after the driver took an epoch's metadata and before the learner fetched its piece: the
learner's fetch fails with a real ObjectLostError and the driver gets TrajectoriesLost naming the
batch, within the fetch timeout (no hang), nothing trained.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _multinode import MultiNodeCluster  # noqa: E402
from _private_head import stop_group  # noqa: E402

pytestmark = pytest.mark.slow

DRIVER = r'''
import json, sys, time
from pathlib import Path
import ray
from raydiff.algorithms.registry import make_algorithm
from raydiff.config import load_config
from raydiff.engine.datapath import EpochBatch, TrajectoriesLost, payload_bytes
from raydiff.engine.learners.handle import LearnerHandle
from raydiff.engine.rollouts.group import RolloutGroup
from raydiff.types import Trajectory

out, model = Path(sys.argv[1]), sys.argv[2]
ray.init(logging_level="ERROR", log_to_driver=False)
cfg = load_config("configs/tiny_ddpo_async.yaml", [
    f"model.path={model}", f"output.run_dir={out / 'run'}", "rollout.num_workers=1", "rollout.resources={rollout: 1}",
    "rollout.max_restarts=0", "rollout.task_timeout_s=30", "learner.engine=torch", "learner.num_workers=1",
    "learner.resources={learner: 1}", "sampling.batch_size=8", "sampling.num_steps=12", "algorithm.train_batch_size=8"])
algo = make_algorithm(cfg.algorithm, cfg.sampling)
rollouts, learner = RolloutGroup(cfg, algo.needs), LearnerHandle(cfg)
rollouts.push_weights(learner.publish())
node = lambda actor: ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))  # noqa: E731
result = {"driver": ray.get_runtime_context().get_node_id(), "rollout": node(rollouts.actors[0]), "learner": node(learner.actor)}
prompts = ["a cat", "a dog", "a cow", "a fox", "a hen", "a pig", "a cat", "a dog"]

def epoch(e):
    rollouts.dispatch(e, [(0, prompts, 7 + e)])
    batches = rollouts.gather(e)
    return batches, algo.prepare(Trajectory.cat([b.meta for b in batches]))

batches, meta = epoch(0)
m = learner.train(EpochBatch(meta, batches, 30.0))
result.update(to_learners=m["data/bytes_to_learners"], meta_bytes=payload_bytes(batches[0].meta), version=learner.version)
batches, meta = epoch(1)
(out / "ready").write_text("")
while not (out / "go").exists():  # the test stops the rollout node now
    time.sleep(0.2)
t0 = time.monotonic()
try:
    learner.train(EpochBatch(meta, batches, 30.0))
    result["lost"] = None
except TrajectoriesLost as e:
    result.update(lost=e.batches, detail=e.detail, lost_after_s=time.monotonic() - t0, version_after=learner.version)
(out / "result.json").write_text(json.dumps(result))
'''


def test_piece_moves_rollout_node_to_learner_node_and_a_lost_node_is_a_clear_error(tmp_path, tiny_sd):
    with MultiNodeCluster(name="rddp") as cluster:
        rollout_node = cluster.add_node(num_cpus=1, resources={"rollout": 1})
        learner_node = cluster.add_node(num_cpus=1, resources={"learner": 1})
        proc = cluster.popen([sys.executable, "-c", DRIVER, str(tmp_path), tiny_sd], str(tmp_path / "driver.log"))
        try:
            deadline = time.time() + 600
            while not (tmp_path / "ready").exists():
                assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-5000:]
                assert time.time() < deadline, "the driver never reached epoch 1"
                time.sleep(0.5)
            stop_group(rollout_node.proc)  # the node, by its process group: raylet, object store and worker
            cluster.nodes.remove(rollout_node)
            (tmp_path / "go").write_text("")
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                stop_group(proc)
        log = (tmp_path / "driver.log").read_text()
        assert proc.returncode == 0, log[-8000:]
        result = json.loads((tmp_path / "result.json").read_text())
    assert (result["rollout"], result["learner"]) == (rollout_node.node_id, learner_node.node_id) != (result["driver"],) * 2
    assert result["to_learners"] > 100_000 > 20 * result["meta_bytes"]  # a plasma object on the rollout node; the driver: metadata
    assert result["lost"] == [0] and "Object" in result["detail"], result  # ObjectLostError or a subclass (reconstruction failed)
    assert result["lost_after_s"] < 60 and result["version_after"] == result["version"] == 1  # no hang, nothing trained
