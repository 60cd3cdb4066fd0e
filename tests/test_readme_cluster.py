"""The README's "On a Ray cluster" block, run verbatim against a private head (token auth on, as written).

Only what a test must add is added: the `ray start --head` line gets its own temp dir and ports (and
--block, so it is stopped by its process group, never `ray stop`), HOME is a temp dir (so the token
the block generates is private), and `ray job submit` finds the private head through RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _private_head import free_port, stop_group  # noqa: E402
from _readme import REPO, bash_block  # noqa: E402


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard port {port} never opened")


@pytest.mark.slow
def test_readme_cluster_recipe_verbatim(tmp_path):
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the README recipe activates ./.venv: run ./install.sh first")
    lines = bash_block("On a Ray cluster").splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("ray start --head"))
    prelude, start, rest = lines[:i], lines[i], lines[i + 1:]
    assert any("RAY_AUTH_MODE=token" in ln for ln in prelude)
    run_dir = REPO / "runs" / "tiny_ddpo_job"
    assert any("output.run_dir=$PWD/runs/tiny_ddpo_job" in ln for ln in rest)
    shutil.rmtree(run_dir, ignore_errors=True)

    tmpdir = f"/tmp/rdrm-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    dash = free_port()
    extra = (f" --port={free_port()} --temp-dir={tmpdir} --include-dashboard=true --dashboard-host=127.0.0.1"
             f" --dashboard-port={dash} --dashboard-agent-listen-port={free_port()}"
             f" --ray-client-server-port={free_port()} --disable-usage-stats --block")
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "PYTHONPATH")}
    env.update(HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0")
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(["bash", "-euo", "pipefail", "-c", "\n".join(prelude + [start + extra])], cwd=REPO, env=env,
                            stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(dash, head)
        time.sleep(3)  # the job API comes up just after the port opens
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(prelude + rest)], cwd=REPO,
                              env=dict(env, RAY_ADDRESS=f"http://127.0.0.1:{dash}"), capture_output=True, text=True,
                              timeout=1200)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:] + (tmp_path / "head.log").read_text()[-3000:]
        assert "succeeded" in out and "Authentication required" not in out, out[-4000:]
        assert (tmp_path / "home" / ".ray" / "auth_token").is_file()
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 15
        # Token auth is really on: a submit without the token is refused.
        bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        denied = subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "job", "list", f"--address=http://127.0.0.1:{dash}"],
                                env=bare, capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0 and "Authentication" in denied.stdout + denied.stderr
    finally:
        try:
            stop_group(head)  # asserts its group (and any worker group it spawned) is gone
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(tmpdir, ignore_errors=True)
