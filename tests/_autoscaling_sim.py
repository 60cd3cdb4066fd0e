"""Run a tiny role-resource job on Ray's fake multi-node autoscaler; print a JSON report.

Started by tests/test_cluster.py in its own process: `python _autoscaling_sim.py TMPDIR`.
It starts its own head (`ray start --head` with a fake_multinode autoscaling config) on free
ports with TMPDIR as Ray's temp dir, so it never touches another Ray cluster on the machine,
and on exit it stops only that head's process group (`ray start --block` in its own session,
see `stop_group`). It prints `HEAD_PID <pid>` first, so the test can stop the group if this helper dies.

Why not ray.cluster_utils.AutoscalingCluster as is: its start()/shutdown() run
`ray stop --force` (kills every Ray process on the machine) and _generate_config() reads
fake_multi_node/example.yaml, which the PyPI wheel does not ship; we hand it the whole config.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Token auth (on by default in recent Ray) reads ~/.ray/auth_token, which other Ray users on
# this machine may regenerate mid-test: this private, loopback-only cluster runs without it.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402

from _private_head import free_port, ray_start, stop_group, wait_started  # noqa: E402

IDLE_TIMEOUT_MIN = 0.1  # 6 s


def fake_config(gcs_port: int) -> dict:
    """Full fake_multinode cluster config (the fields of Ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "raydiff-fake",
        "max_workers": 4,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Fake nodes join this GCS (default would be :6379, maybe someone else's cluster).
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "rollout_node": {"resources": {"CPU": 1, "rollout": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
            "learner_node": {"resources": {"CPU": 1, "learner": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def role_nodes() -> dict[str, int]:
    counts = {"rollout": 0, "learner": 0, "alive": 0}
    for n in ray.nodes():
        if n["Alive"]:
            counts["alive"] += 1
            for role in ("rollout", "learner"):
                if n["Resources"].get(role):
                    counts[role] += 1
    return counts


HEAD: list = []  # the blocking `ray start --head` process, once started


def main(tmpdir: str) -> dict:
    from raydiff.engine.cluster.placement import PlacementError, check_feasible, create_placement_group

    t0 = time.time()
    report: dict = {"events": []}

    def event(name, **kw):
        report["events"].append({"t": round(time.time() - t0, 1), "event": name, **kw})

    gcs_port = free_port()
    config_path = os.path.join(tmpdir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(fake_config(gcs_port), f)
    env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = os.path.join(tmpdir, "ray-start.log")
    head = ray_start(
        [
            "--head",
            f"--port={gcs_port}",
            f"--temp-dir={tmpdir}",
            f"--autoscaling-config={config_path}",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ],
        env, log,
    )
    HEAD.append(head)
    print(f"HEAD_PID {head.pid}", flush=True)
    wait_started(head, log, timeout_s=60)
    event("head_started")
    ray.init(address=f"127.0.0.1:{gcs_port}", logging_level="ERROR", log_to_driver=False)

    # Feasibility against the autoscaler's node types (read from this cluster's monitor):
    # nothing is alive but the head, yet rollout/learner asks are launchable...
    check_feasible("rollout", [{"CPU": 1, "rollout": 1}] * 2, timeout_s=10)
    # ...while an ask no node type offers fails at once, not after a scale-up timeout.
    t = time.time()
    try:
        check_feasible("learner", [{"CPU": 1, "learner": 2}], timeout_s=10)
        report["infeasible_error"] = None
    except PlacementError as e:
        report["infeasible_error"] = str(e)
    report["infeasible_s"] = round(time.time() - t, 2)

    @ray.remote(num_cpus=1)
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            node = next(n for n in ray.nodes() if n["NodeID"] == ctx.get_node_id())
            return sorted(k for k in node["Resources"] if k in ("rollout", "learner"))

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pgs = {
        "rollout": create_placement_group("rollout", [{"CPU": 1, "rollout": 1}] * 2, strategy="SPREAD", timeout_s=60),
    }
    event("rollout_pg_ready", nodes=role_nodes())
    pgs["learner"] = create_placement_group("learner", [{"CPU": 1, "learner": 1}], strategy="PACK", timeout_s=60)
    event("learner_pg_ready", nodes=role_nodes())

    placed = {}
    for role, pg in pgs.items():
        actors = [
            Probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
            for i in range(len(pg.bundle_specs))
        ]
        placed[role] = ray.get([a.where.remote() for a in actors], timeout=60)
        for a in actors:
            ray.kill(a)
    report["placed"] = placed
    report["scaled_up"] = role_nodes()
    event("work_done")

    for pg in pgs.values():
        ray.util.remove_placement_group(pg)
    deadline = time.time() + 60
    while time.time() < deadline:
        if role_nodes()["alive"] == 1:
            break
        time.sleep(1)
    report["scaled_down"] = role_nodes()
    event("idle_removed" if report["scaled_down"]["alive"] == 1 else "idle_not_removed")
    return report


if __name__ == "__main__":
    tmpdir = os.path.abspath(sys.argv[1])
    try:
        result = main(tmpdir)
        rc = 0
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(e).__name__}: {e}"}
        rc = 1
    finally:
        try:
            ray.shutdown()
        finally:
            if HEAD:
                try:
                    result["stopped_groups"] = sorted(stop_group(*HEAD))
                except AssertionError as e:
                    result["error"] = f"{result.get('error', '')} stop: {e}"
                    rc = 1
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(rc)
