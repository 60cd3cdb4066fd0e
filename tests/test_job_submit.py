"""`ray job submit --working-dir . -- python -m raydiff.train ...` against a local `ray start --head` cluster."""

import os
import re
import subprocess
import time
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _private_head import free_port, ray_start, stop_group, wait_started  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _head(tmpdir: str, num_cpus: int):
    """`ray start --head` as a user would, with the job server: (process, dashboard address, env)."""
    dash = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # The job's `python` is looked up on PATH: make it this interpreter (its venv), not a system one.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    os.makedirs(tmpdir, exist_ok=True)
    log = os.path.join(tmpdir, "ray-start.log")
    head = ray_start(
        ["--head", f"--port={free_port()}", f"--temp-dir={tmpdir}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
        env, log,
    )
    try:
        wait_started(head, log)
    except BaseException:
        stop_group(head)
        raise
    return head, f"http://127.0.0.1:{dash}", env


def _submit(address: str, env: dict, config: str, *overrides: str) -> subprocess.CompletedProcess:
    runtime_env = '{"env_vars": {"RAYDIFF_CACHE": "%s", "HF_HUB_OFFLINE": "1"}, "excludes": ["runs/", ".git/"]}' % os.environ["RAYDIFF_CACHE"]
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={address}", "--working-dir", ".",
         f"--runtime-env-json={runtime_env}", "--", "python", "-m", "raydiff.train", config, *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def private_head():
    """A head with 6 CPUs (room for every role); stopped by its process group (tmpdir short: socket paths < 108 bytes)."""
    head, address, env = _head(f"/tmp/rdjob-{os.getpid()}", 6)
    try:
        yield address, env
    finally:
        stop_group(head)


@pytest.mark.parametrize("config", ["configs/tiny_ddpo_async.yaml", "configs/tiny_dag_sdxl.yaml"])
def test_ray_job_submit_succeeds(private_head, config, tmp_path):
    address, env = private_head
    run_dir = tmp_path / "run"
    proc = _submit(address, env, config, "train.num_epochs=2", f"output.run_dir={run_dir}", "output.progress=false",
                   "learner.num_workers=1", "output.tensorboard=false")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"Job '\S+' succeeded", out), out[-4000:]
    assert (run_dir / "metrics.jsonl").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_job_that_cannot_fit_a_2_cpu_cluster_fails_within_a_minute_naming_the_demand(tmp_path):
    """The shipped async config on `ray start --head --num-cpus=2` (a 2-core machine): each role fits alone, not
    all together. Ray Train used to retry its worker group without end; the run must fail at start instead."""
    head, address, env = _head(f"/tmp/rdjob2-{os.getpid()}", 2)
    try:
        t0 = time.monotonic()
        proc = _submit(address, env, "configs/tiny_ddpo_async.yaml", f"output.run_dir={tmp_path / 'run'}", "output.progress=false")
        elapsed = time.monotonic() - t0
    finally:
        stop_group(head)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and re.search(r"Job '\S+' failed", out), out[-4000:]
    assert "roles together need" in out and "rollout" in out and "learner" in out, out[-4000:]  # each role's demand, named
    assert "CPU" in out and "2" in out
    assert elapsed < 60, f"the infeasible job took {elapsed:.0f} s to fail (it must fail at start, not wait)"
