"""Every bench in bench/run_all.py still runs (tiny sizes, one repeat) and prints its RATIO line.

The figures of a quick run mean nothing; this only keeps the benches from rotting as the
engine changes. Each bench is its own process with its own local Ray cluster, as in run_all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from run_all import BENCHES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_quick_mode_runs(name, tmp_path):
    quick = BENCHES[name][1]
    # A loaded CI machine can take more than Ray's default 10 s to register the raylet.
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", RAY_raylet_start_wait_time_s="120",
               RAYDIFF_CACHE=os.environ.get("RAYDIFF_CACHE", ""))
    if not env["RAYDIFF_CACHE"]:
        env.pop("RAYDIFF_CACHE")
    proc = subprocess.run([sys.executable, *quick], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ratios = re.findall(r"^RATIO (\S+) (\S+)$", out, re.M)
    assert ratios, f"{name} printed no RATIO line:\n{out[-4000:]}"
    for label, value in ratios:
        assert re.fullmatch(r"-?\d+(\.\d+)?|inf|nan", value), f"{label}: {value!r} is not a number"
