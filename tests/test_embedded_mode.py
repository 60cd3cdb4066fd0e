"""Embedded mode (issue #14 point 8): with no RAY_ADDRESS and no `ray_address`, a run starts its own
local cluster, even when the machine's address file names a cluster that died.

A live other cluster beside the embedded run: tests/test_console_quiet.py (a `ray start --head` up
during a whole run). Here: a stale `ray_current_cluster` (a dead cluster's address, as a crashed
`ray start` leaves behind) under a private RAY_TMPDIR must not make the embedded start try to join it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _private_head import free_port, stop_group  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, ray
from raydiff.config import load_config
from raydiff.engine.trainer import connect_ray
connect_ray(load_config("configs/tiny_ddpo.yaml", []))
ctx = ray.get_runtime_context()
print("RESULT " + json.dumps({"gcs": ctx.gcs_address, "cpus": ray.cluster_resources().get("CPU", 0)}))
ray.shutdown()
"""


def test_embedded_start_ignores_a_dead_clusters_address_file(tmp_path):
    ray_tmp = f"/tmp/rdst-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    (Path(ray_tmp) / "ray").mkdir(parents=True, exist_ok=True)
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        try:
            stop_group(proc)  # its embedded cluster's processes share its group
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["gcs"] != dead and result["cpus"] >= 1, result
