"""Reward deployments as cluster citizens, on a real multi-node local Ray cluster (tests/_multinode.py).

Nodes: head (0 CPUs), a `reward` node ({reward: 2}) and a `rollout` node ({rollout: 1}), each its
own `ray start` with its own temp dir. Shown here:
- reward replicas asking {reward: 1} run on the reward node, never elsewhere;
- the autoscaling config reaches Serve (read back from the controller; min_replicas replicas run);
- a second deploy with other args is refused naming the difference, or replaced with reuse=replace;
- the app the trainer deployed is gone after a finished run and after Ctrl-C (SIGINT) on the driver.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _multinode import REPO, MultiNodeCluster  # noqa: E402
from _private_head import free_port  # noqa: E402

REWARD = {"name": "brightness", "num_cpus": 0.5, "resources": {"reward": 1}}


@pytest.fixture(scope="module")
def cluster():
    with MultiNodeCluster() as c:
        c.reward_node = c.add_node(num_cpus=2, resources={"reward": 2})
        c.rollout_node = c.add_node(num_cpus=3, resources={"rollout": 1})
        yield c


SERVICE_DRIVER = r"""
import json, ray
import httpx
from ray import serve
from raydiff.rewards.client import encode_images
from raydiff.rewards.serve import deploy
from raydiff.rewards.serve.reuse import RewardAppMismatch, app_details, replica_nodes
from raydiff.rewards.service_config import RewardServiceConfig
import numpy as np

ray.init(logging_level="ERROR")
APP = "mn-rewards"

def cfg(reuse="error", **kw):
    comp = dict(REWARD, max_batch_size=4, max_ongoing_requests=8,
                autoscaling_config=dict(min_replicas=2, max_replicas=3, target_ongoing_requests=3,
                                        upscale_delay_s=1, downscale_delay_s=5))
    comp.update(kw)
    return RewardServiceConfig(port=PORT, proxy_location="HeadOnly", app_name=APP, route_prefix="/mn",
                               reuse=reuse, rewards=[comp])

def deployed():
    d = app_details(APP).deployments["reward_brightness"]
    return app_details(APP).last_deployed_time_s, d

out = {}
url = deploy(cfg())
t0, d = deployed()
out["running"] = int(serve.status().applications[APP].deployments["reward_brightness"].replica_states.get("RUNNING", 0))
out["nodes"] = replica_nodes(APP)
ac = d.deployment_config.autoscaling_config
out["autoscaling"] = ac if isinstance(ac, dict) else ac.model_dump()
out["actor_options"] = d.deployment_config.ray_actor_options.model_dump(exclude_unset=True)
body = {"prompts": ["a"], "images": encode_images(np.full((1, 8, 8, 3), 255, np.uint8))}
out["score"] = httpx.post(url + "/v1/rewards/brightness:score", json=body, timeout=60).json()["scores"]
deploy(cfg())  # same config: left running as it is
out["same_config_redeployed"] = deployed()[0] != t0
try:
    deploy(cfg(max_batch_size=8))
    out["refused"] = None
except RewardAppMismatch as e:
    out["refused"] = str(e)
out["after_refusal_batch"] = deployed()[1].deployment_config.user_config["config"]["max_batch_size"]
deploy(cfg(reuse="replace", max_batch_size=8))
out["after_replace_batch"] = deployed()[1].deployment_config.user_config["config"]["max_batch_size"]
out["after_replace_nodes"] = replica_nodes(APP)
import os
os.environ["RAYDIFF_REWARD_TOKEN"] = "s3cret"  # same config, but now a bearer token: another app
try:
    deploy(cfg(max_batch_size=8))
    out["token_refused"] = None
except RewardAppMismatch as e:
    out["token_refused"] = str(e)
del os.environ["RAYDIFF_REWARD_TOKEN"]
serve.delete(APP)
out["apps_after_delete"] = sorted(serve.status().applications)
print(json.dumps(out))
"""


def test_reward_replicas_placement_autoscaling_and_reuse(cluster):
    code = f"REWARD = {REWARD!r}\nPORT = {free_port()}\n" + SERVICE_DRIVER
    out = cluster.run_driver(code, timeout=400)
    reward_node = cluster.reward_node.node_id
    # min_replicas replicas run, and every one of them on the reward node.
    assert out["running"] == 2
    assert out["nodes"]["reward_brightness"] == [reward_node, reward_node], out["nodes"]
    assert out["after_replace_nodes"]["reward_brightness"] == [reward_node, reward_node]
    assert out["actor_options"]["resources"] == {"reward": 1.0} and out["actor_options"]["num_cpus"] == 0.5
    a = out["autoscaling"]
    assert (a["min_replicas"], a["max_replicas"], a["target_ongoing_requests"]) == (2, 3, 3.0)
    assert (a["upscale_delay_s"], a["downscale_delay_s"]) == (1.0, 5.0)
    assert out["score"] == [pytest.approx(1.0)]
    # Same config: reused, not redeployed. Other args: refused naming the field and the fix; replace redeploys.
    assert out["same_config_redeployed"] is False
    assert "max_batch_size: running 4, asked 8" in out["refused"] and "reuse=replace" in out["refused"], out["refused"]
    assert out["after_refusal_batch"] == 4 and out["after_replace_batch"] == 8
    assert "bearer token" in out["token_refused"], out["token_refused"]
    assert "mn-rewards" not in out["apps_after_delete"]


APPS = "import json, ray; from ray import serve; ray.init(logging_level='ERROR'); print(json.dumps(sorted(serve.status().applications)))"
NODES = ("import json, ray; ray.init(logging_level='ERROR'); from raydiff.rewards.serve.reuse import replica_nodes; "
         "print(json.dumps(replica_nodes('{app}')))")


def _train_args(app: str, run_dir, epochs: int) -> list[str]:
    return [sys.executable, "-m", "raydiff.train", "configs/tiny_ddpo.yaml", "reward.backend=serve",
            f"reward.serve_app={app}", f"reward.components=[{json.dumps(REWARD)}]", "rollout.resources={rollout: 1}",
            "learner.engine=torch", f"train.num_epochs={epochs}", "sampling.num_steps=2", "sampling.batch_size=2",
            f"output.run_dir={run_dir}", "output.progress=false", "output.tensorboard=false", "output.checkpoint_every=0",
            "output.image_grid_every=0"]


@pytest.mark.slow
def test_trainer_deletes_its_app_after_training(cluster, tmp_path):
    log = tmp_path / "train.log"
    proc = cluster.popen(_train_args("mn-train", tmp_path / "run", 1), str(log))
    assert proc.wait(timeout=500) == 0, log.read_text()[-5000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert "mn-train" not in cluster.run_driver(APPS)


@pytest.mark.slow
def test_trainer_deletes_its_app_on_ctrl_c(cluster, tmp_path):
    log, metrics = tmp_path / "train.log", tmp_path / "run" / "metrics.jsonl"
    # Runs until the Ctrl-C: with 500 epochs a fast machine finished before the signal (CI, 0.22 s per epoch).
    proc = cluster.popen(_train_args("mn-ctrlc", tmp_path / "run", 100_000), str(log))
    try:
        deadline = time.time() + 400
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):  # training is under way
            assert proc.poll() is None, log.read_text()[-5000:]
            assert time.time() < deadline, log.read_text()[-5000:]
            time.sleep(1)
        # The trainer's reward replica runs on the reward node.
        assert cluster.run_driver(NODES.format(app="mn-ctrlc"))["reward_brightness"] == [cluster.reward_node.node_id]
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends the driver
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in log.read_text()
    assert "mn-ctrlc" not in cluster.run_driver(APPS), log.read_text()[-3000:]


# ---- shipped configs against the shipped cluster files (no Ray needed) ----------------------------


def _served_components():
    """(config file, field, component) for every reward deployed on Serve by a shipped config."""
    import glob

    from raydiff.config import load_config
    from raydiff.rewards.service_config import load_service_config

    service = load_service_config(os.path.join(REPO, "configs/rewards.yaml"))
    out = [("configs/rewards.yaml", f"rewards[{i}]", c) for i, c in enumerate(service.rewards)]
    for path in sorted(glob.glob("configs/*.yaml", root_dir=REPO)):
        if path.endswith("rewards.yaml"):
            continue
        cfg = load_config(os.path.join(REPO, path))
        if cfg.reward.backend == "serve":
            out += [(path, f"reward.components[{i}]", c) for i, c in enumerate(cfg.reward.components)]
    return out


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml"])
def test_gpu_configs_put_rewards_on_reward_nodes(launcher):
    """Every GPU reward of a shipped config asks for the `reward` resource, fits one reward node type, and its
    autoscaling ceiling fits that type's max_workers (so the autoscaler can launch what Serve asks for)."""
    import yaml

    from raydiff.engine.cluster.placement import _fits, role_bundles
    from raydiff.engine.cluster.shapes import _shapes_from_autoscaler_config

    with open(os.path.join(REPO, "cluster", launcher)) as f:
        shapes = _shapes_from_autoscaler_config(yaml.safe_load(f))
    served = _served_components()
    assert {p for p, _, _ in served} >= {"configs/rewards.yaml", "configs/ddpo_sd15.yaml", "configs/dag_sdxl.yaml",
                                         "configs/ddpo_sdxl.yaml"}
    for path, field, c in served:
        if c.registry_name in ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "color_target"):
            continue  # weight-free CPU rewards
        assert c.num_gpus > 0 and c.resources.get("reward", 0) > 0, f"{path} {field}: GPU reward without GPUs/reward"
        [bundle] = role_bundles(c)
        homes = [s for s in shapes if _fits(bundle, s)]
        assert homes and all(s.resources.get("reward") for s in homes), f"{path} {field}: {bundle} fits {homes}"
        most = c.autoscaling_config.max_replicas if c.autoscaling_config else c.num_replicas
        capacity = sum(s.count * s.resources["reward"] / c.resources["reward"] for s in homes)
        assert most <= capacity, f"{path} {field}: up to {most} replicas, reward nodes hold {capacity}"
