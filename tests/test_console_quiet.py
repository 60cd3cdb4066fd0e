"""The embedded default's console: raydiff's lines only, no error/warning noise; and it runs beside another cluster.

Another Ray cluster runs on the machine the way a user's `ray start --head` would (its address file
in the default temp dir, here under a private RAY_TMPDIR): the embedded run must start its own
cluster anyway, not join that one ("When connecting to an existing cluster, num_cpus ... must not be
provided"), and leave it running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _private_head import free_port, stop_group  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"error|warning|failed", re.I)


@pytest.mark.slow
def test_embedded_default_is_quiet_and_ignores_another_local_cluster(tmp_path):
    ray_tmp = f"/tmp/rdcq-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={free_port()}", "--num-cpus=1",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
    try:
        deadline = time.time() + 120
        while not address_file.is_file():
            assert head.poll() is None and time.time() < deadline, "private ray start --head did not come up"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        # Its own session too: what its embedded cluster leaves behind is stopped with its group.
        train = subprocess.Popen([sys.executable, "-m", "raydiff.train", "configs/tiny_ddpo.yaml", "train.num_epochs=3",
                                  f"output.run_dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = train.communicate(timeout=900)
        finally:
            stop_group(train)
        proc = subprocess.CompletedProcess(train.args, train.returncode, out, err)
        console = [ln.strip() for ln in re.split(r"[\r\n]", proc.stdout + proc.stderr) if ln.strip()]
        assert proc.returncode == 0, "\n".join(console[-60:])
        noisy = [ln for ln in console if NOISE.search(ln)]
        assert noisy == [], "console lines that read like failures:\n" + "\n".join(noisy)
        epochs = [ln for ln in console if re.match(r"epoch \d+/3 ", ln)]
        assert len(epochs) == 3, console
        for ln in epochs:  # figures to at most 4 significant digits
            for num in re.findall(r"\d[\d.]*(?:e-?\d+)?", ln.split(" ", 2)[2]):
                assert len(num.split("e")[0].replace(".", "").lstrip("0")) <= 4, (num, ln)
        assert any(ln.startswith("raydiff: run finished") and "final reward" in ln for ln in console)
        non_bar = [ln for ln in console if not ln.startswith("epochs:")]
        assert len(non_bar) <= 5, non_bar  # 3 epoch lines + the result
        log = (run_dir / "logs" / "console.log").read_text()
        assert "Started a local Ray instance" in log  # embedded: its own cluster, not the one above
        assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3
        assert head.poll() is None, "the other cluster must be left running"
    finally:
        try:
            stop_group(head)  # asserts its group (and any worker group it spawned) is gone
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
