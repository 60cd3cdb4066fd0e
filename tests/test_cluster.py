"""The cluster surface: launcher YAMLs, KubeRay manifests, placement on real (local) Ray.

- cluster/aws.yaml, cluster/gcp.yaml: Ray's own config validation (ray-schema.json), then
  prepare_config (defaults merged, as `ray up` does before it contacts the cloud) validated
  again; role resources declared on the right worker types.
- cluster/kuberay/*.yaml: validated against the KubeRay 1.7 CRD schemas (tests/data/kuberay-crd).
- placement: infeasible asks fail at once on a fixed CPU cluster; feasible ones get a group.
- autoscaling: Ray's fake multi-node autoscaler, in a subprocess with its own cluster
  (tests/_autoscaling_sim.py), scales role node types up for placement groups and back down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = Path(__file__).parent / "data" / "kuberay-crd"
ROLES = ("rollout", "reward", "learner")


# --------------------------------------------------------------------------- launcher YAMLs


@pytest.fixture(params=["aws.yaml", "gcp.yaml"])
def launcher_config(request):
    return request.param, yaml.safe_load((CLUSTER / request.param).read_text())


def test_launcher_config_validates_with_ray(launcher_config):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    name, config = launcher_config
    validate_config(config)  # ray/autoscaler/ray-schema.json + Ray's extra checks
    prepared = prepare_config(config)  # offline: merges <provider>/defaults.yaml, fills min/max
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.split(".")[0]
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert any("raydiff" in c for c in config["setup_commands"]), "setup_commands must install raydiff"


def test_launcher_config_roles(launcher_config):
    name, config = launcher_config
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "head must be CPU-only"
    assert config["idle_timeout_minutes"] > 0
    by_role = {}
    for type_name, node_type in types.items():
        if type_name == config["head_node_type"]:
            continue
        roles = [r for r in ROLES if node_type["resources"].get(r)]
        assert len(roles) == 1, f"{name}:{type_name} must declare exactly one role resource, got {roles}"
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name}:{type_name} is a GPU worker type"
        assert node_type["resources"].get("CPU", 0) >= 1
        assert 0 == node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
        by_role[roles[0]] = node_type
    assert set(by_role) == set(ROLES)
    # Learner nodes hold one learner unit per GPU (one Ray Train worker per GPU).
    assert by_role["learner"]["resources"]["learner"] == by_role["learner"]["resources"]["GPU"] >= 8
    assert config["file_mounts"], "configs are mounted"


def test_launcher_configs_describe_same_roles():
    aws, gcp = (yaml.safe_load((CLUSTER / f).read_text()) for f in ("aws.yaml", "gcp.yaml"))
    strip = lambda c: {  # noqa: E731
        r: t["resources"].get(r) for t in c["available_node_types"].values() for r in ROLES if r in t["resources"]
    }
    assert strip(aws) == strip(gcp)


def _all_commands(config: dict) -> list[str]:
    cmds = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        cmds += config.get(key) or []
    for node_type in config["available_node_types"].values():
        cmds += node_type.get("initialization_commands", []) + node_type.get("worker_setup_commands", [])
    return cmds


def test_launcher_installs_one_pinned_raydiff_and_torch_only_from_the_image(launcher_config):
    name, config = launcher_config
    setup = " ".join(config["setup_commands"])
    assert setup.count("RAYDIFF_REF=") == 1, "one variable gives the raydiff version"
    assert 'pip install --quiet --constraint /tmp/torch-pin.txt "$RAYDIFF_REF"' in setup
    assert "import torch" in setup  # pin file from the image's torch; fails the node if the image has none
    for cmd in _all_commands(config):
        assert not re.search(r"pip3? install[^;&|]*\s['\"]?torch([=<>~!\s'\"]|$)", cmd), f"{name}: torch downloaded at boot: {cmd}"
    docker = config["docker"]
    assert docker["image"] == docker["head_image"] and not docker["image"].startswith("rayproject/"), \
        "the stock Ray image has no torch: use the image built from cluster/Dockerfile"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}"' in dockerfile and "ARG RAYDIFF_REF" in dockerfile


def test_launcher_mounts_shared_storage_and_sets_nccl_for_learners(launcher_config):
    name, config = launcher_config
    mount = " ".join(config["initialization_commands"])  # on the host, before Docker
    expected = {"aws": r"mount -t nfs4 .*\$EFS_DNS:/ /mnt/shared", "gcp": r"mount -t nfs .*\$FILESTORE /mnt/shared"}
    assert re.search(expected[name.split(".")[0]], mount), mount
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    learner = next(t for t in config["available_node_types"].values() if t["resources"].get("learner"))
    options = " ".join(learner["docker"]["worker_run_options"])
    assert "NCCL_SOCKET_IFNAME=^lo,docker0" in options and "memlock=-1:-1" in options
    if name == "aws.yaml":
        assert "FI_PROVIDER=efa" in options and "FI_EFA_USE_DEVICE_RDMA=1" in options and "--privileged" in options
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for word in ("p4d.24xlarge", "p5.48xlarge", "a3-highgpu-8g", "GPUDirect-TCPX", "FI_EFA_USE_DEVICE_RDMA",
                 "output.run_dir=/mnt/shared/runs/dag_sdxl"):
        assert word in docs, f"docs/cluster.md does not document {word}"


def test_gpu_configs_send_reward_replicas_to_reward_nodes():
    """Reward deployments ask for the `reward` resource the reward node types declare (schema field from the serve work)."""
    from raydiff.config import RewardComponent, load_config

    if "resources" not in RewardComponent.model_fields:
        pytest.skip("reward components have no `resources` field yet (added with the reward-deployment schema)")
    offered = {r for t in yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"].values() for r in t["resources"]}
    for name in ("dag_sdxl", "ddpo_sd15"):
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
        assert cfg.reward.backend == "serve"
        for component in cfg.reward.components:
            assert component.resources.get("reward") == 1, f"{name}: reward {component.name} does not ask for a reward node"
            assert set(component.resources) <= offered


# --------------------------------------------------------------------------- KubeRay


def _crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CRD_DIR / f"{kind.lower()}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validate(doc: dict, kind: str) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert doc["metadata"]["name"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _crd_validator(kind).iter_errors(doc)]


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def _group_resources(group: dict) -> dict:
    # rayStartParams values are strings; `resources` is a JSON object quoted once more for the
    # shell: '"{\"rollout\": 1}"'.
    raw = group["rayStartParams"]["resources"]
    return json.loads(json.loads(raw))


@pytest.mark.parametrize("fname,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"), ("rayservice.yaml", "RayService")])
def test_kuberay_manifest_matches_crd(fname, kind):
    doc = yaml.safe_load((CLUSTER / "kuberay" / fname).read_text())
    assert _validate(doc, kind) == []
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] in ROLES
        assert _group_resources(group).get(group["groupName"], 0) >= 1
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) + group["minReplicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        # A group-level `resources` next to rayStartParams.resources is rejected by KubeRay.
        assert "resources" not in group


def test_kuberay_roles_and_entrypoints():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert {g["groupName"] for g in rc["spec"]["workerGroupSpecs"]} == set(ROLES)
    assert all(g["minReplicas"] == 0 for g in rc["spec"]["workerGroupSpecs"])
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"] == "python -m raydiff.train configs/dag_sdxl.yaml output.run_dir=/mnt/shared/runs/dag_sdxl"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    svc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "raydiff.rewards.serve:app_builder"
    assert app["args"] == {"config": "configs/rewards.yaml"}
    assert [g["groupName"] for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["reward"]


def _pod_templates(doc: dict):
    spec = _cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


@pytest.mark.parametrize("fname", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_pods_have_shm_in_memory_and_the_shared_volume(fname):
    doc = yaml.safe_load((CLUSTER / "kuberay" / fname).read_text())
    for group, pod in _pod_templates(doc):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{fname}:{group}"
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == "raydiff-shared", f"{fname}:{group}"
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "raydiff-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_crd_validation_catches_mistakes():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    bad = json.loads(json.dumps(rc))
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    bad["spec"]["workerGroupSpecs"][1]["rayStartParams"]["resources"] = {"reward": 1}  # must be a string
    bad["spec"]["enableInTreeAutoscaling"] = "yes"
    errors = _validate(bad, "RayCluster")
    assert any("groupName" in e for e in errors)
    assert any("rayStartParams/resources" in e for e in errors)
    assert any("enableInTreeAutoscaling" in e for e in errors)


# --------------------------------------------------------------------------- placement


def test_role_bundles_from_sections():
    from raydiff.engine.cluster.placement import PlacementError, role_bundles

    rollout = NS(num_workers=2, num_gpus=1.0, num_cpus=4.0, resources={"rollout": 1})
    assert role_bundles(rollout) == [{"CPU": 4.0, "GPU": 1.0, "rollout": 1.0}] * 2
    learner = NS(num_workers=3, use_gpu=True, num_cpus=8.0, resources={"learner": 1})
    assert role_bundles(learner) == [{"CPU": 8.0, "GPU": 1.0, "learner": 1.0}] * 3
    assert role_bundles(NS(num_workers=1, use_gpu=False, num_cpus=1.0, resources={})) == [{"CPU": 1.0}]
    with pytest.raises(PlacementError, match="num_gpus"):
        role_bundles(NS(num_workers=1, num_gpus=0, num_cpus=1, resources={"GPU": 1}))


def test_role_bundles_from_run_config():
    config = pytest.importorskip("raydiff.config", reason="raydiff.config not importable yet", exc_type=ImportError)
    from raydiff.engine.cluster.placement import role_bundles

    rollout = config.RolloutSection(num_workers=2, num_gpus=0.5, num_cpus=2, resources={"rollout": 1})
    learner = config.LearnerSection(num_workers=1, use_gpu=True, resources={"learner": 1})
    assert role_bundles(rollout) == [{"CPU": 2.0, "GPU": 0.5, "rollout": 1.0}] * 2
    assert role_bundles(learner) == [{"CPU": 1.0, "GPU": 1.0, "learner": 1.0}]


def test_node_types_from_launcher_yaml():
    from raydiff.engine.cluster.shapes import _shapes_from_autoscaler_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    shapes = {s.name: s for s in _shapes_from_autoscaler_config(config)}
    assert config["head_node_type"] not in shapes
    assert shapes["rollout_l4"].resources == {"CPU": 8.0, "GPU": 1.0, "rollout": 1.0}
    assert shapes["learner_a100"].count == 2 and shapes["learner_a100"].launchable


@pytest.fixture(scope="module")
def cpu_ray():
    """A fixed-size CPU-only cluster (no autoscaler); reuses a session cluster if one is up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_check_feasible_refuses_gpus_on_cpu_cluster(cpu_ray):
    from raydiff.engine.cluster.placement import PlacementError, check_feasible, create_placement_group, role_bundles

    bundles = role_bundles(NS(num_workers=2, num_gpus=1, num_cpus=1, resources={}))
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        check_feasible("rollout", bundles, timeout_s=5)
    assert time.monotonic() - t0 < 3
    message = str(info.value)
    assert "rollout asks 1 GPU per worker" in message
    assert "largest node" in message and "CPU:" in message
    assert "lower rollout.num_gpus" in message and "node type with GPUs" in message
    # create_placement_group checks first: no group is left pending.
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="GPU"):
        create_placement_group("rollout", bundles, timeout_s=60)
    assert time.monotonic() - t0 < 3
    with pytest.raises(PlacementError, match="learner.use_gpu=false"):
        check_feasible("learner", role_bundles(NS(num_workers=1, use_gpu=True, num_cpus=1, resources={})))
    with pytest.raises(PlacementError, match="remove 'rollout' from rollout.resources"):
        check_feasible("rollout", [{"CPU": 1, "rollout": 1}])


def test_check_feasible_with_node_types(cpu_ray):
    from raydiff.engine.cluster.placement import PlacementError, check_feasible

    gpu_type = [{"name": "rollout_l4", "resources": {"CPU": 8, "GPU": 1, "rollout": 1}, "max_workers": 2}]
    check_feasible("rollout", [{"CPU": 1, "GPU": 1, "rollout": 1}] * 2, node_types=gpu_type)
    with pytest.raises(PlacementError, match="at most 2 GPU"):
        check_feasible("rollout", [{"CPU": 1, "GPU": 1, "rollout": 1}] * 3, node_types=gpu_type)
    with pytest.raises(PlacementError, match="but no node or node type can ever offer 16 CPU"):
        check_feasible("rollout", [{"CPU": 16, "GPU": 1}], node_types=gpu_type)
    split = [{"name": "gpu", "resources": {"CPU": 8, "GPU": 1}}, {"name": "tagged", "resources": {"CPU": 8, "rollout": 1}}]
    with pytest.raises(PlacementError, match="no single node offers all of it together"):
        check_feasible("rollout", [{"CPU": 1, "GPU": 1, "rollout": 1}], node_types=split)


def test_create_placement_group_and_timeout(cpu_ray):
    import ray
    from raydiff.engine.cluster.placement import PlacementError, create_placement_group

    free = ray.available_resources().get("CPU", 0)
    if free < 1:
        pytest.skip("no free CPU on the shared cluster")
    pg = create_placement_group("learner", [{"CPU": 1}], strategy="PACK", timeout_s=20)
    try:
        assert ray.util.placement_group_table(pg)["state"] == "CREATED"
        # Feasible in principle (the cluster has the CPUs) but not now: times out, is removed.
        total = ray.cluster_resources()["CPU"]
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match="not placed within 1s and was removed"):
            create_placement_group("learner", [{"CPU": total}], strategy="STRICT_PACK", timeout_s=1)
        assert time.monotonic() - t0 < 5
        pending = [p for p in ray.util.placement_group_table().values() if p["name"].startswith("raydiff-learner") and p["state"] not in ("CREATED", "REMOVED")]
        assert pending == []
    finally:
        ray.util.remove_placement_group(pg)


# --------------------------------------------------------------------------- autoscaler


def test_autoscaler_adds_and_removes_role_nodes():
    """Placement groups asking for `rollout`/`learner` make Ray's fake autoscaler add exactly
    those node types; the actors run there; idle nodes go after the idle timeout."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _private_head import stop_group

    tmpdir = tempfile.mkdtemp(prefix="rdas", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # Its own session: the helper and anything left of its head are stopped by process group.
    helper = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_autoscaling_sim.py"), tmpdir],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
                              start_new_session=True)
    try:
        out, err = helper.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_group(helper)  # its head is still its child, so found as a descendant
        out, err = helper.communicate()
        err += "\nhelper timed out"
    heads = [int(l.split()[1]) for l in out.splitlines() if l.startswith("HEAD_PID ")]
    try:
        stop_group(helper, *heads)  # also when the helper died hard; asserts every group is gone
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    proc = subprocess.CompletedProcess(helper.args, helper.returncode, out, err)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"helper printed no result (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in report, report
    assert report["stopped_groups"] and heads[0] in report["stopped_groups"]
    assert report["infeasible_error"] and report["infeasible_s"] < 2
    assert "learner asks 2 learner per worker" in report["infeasible_error"]
    assert "learner_node" in report["infeasible_error"]
    assert report["scaled_up"] == {"rollout": 2, "learner": 1, "alive": 4}
    assert report["placed"] == {"rollout": [["rollout"], ["rollout"]], "learner": [["learner"]]}
    assert report["scaled_down"] == {"rollout": 0, "learner": 0, "alive": 1}
