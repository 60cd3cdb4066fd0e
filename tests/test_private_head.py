"""stop_group: stops a started process's group and the groups its descendants escaped to, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _private_head import descendants, stop_group  # noqa: E402

# A parent that starts one child in its own group (as raylet does with workers) and one that ignores SIGTERM.
TREE = """
import signal, subprocess, sys, time
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
subprocess.Popen([sys.executable, "-c", code])
print("up", flush=True)
time.sleep(600)
"""


def _wait_children(pid: int, n: int) -> list[int]:
    deadline = time.time() + 30
    while len(kids := descendants(pid)) < n:
        assert time.time() < deadline, kids
        time.sleep(0.1)
    return kids


def test_stop_group_stops_escaped_groups_and_sigterm_ignorers():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        kids = _wait_children(proc.pid, 2)
        escaped = {os.getpgid(k) for k in kids} - {proc.pid}
        assert len(escaped) == 1  # the setsid child leads a group of its own
        t0 = time.time()
        groups = stop_group(proc, grace_s=1.0)
        assert groups == {proc.pid} | escaped
        assert time.time() - t0 < 20
        for g in groups:
            with pytest.raises(ProcessLookupError):
                os.killpg(g, 0)
        assert proc.returncode is not None
        assert bystander.poll() is None  # a group it did not start is left alone
    finally:
        stop_group(bystander)
