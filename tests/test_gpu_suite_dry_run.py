"""bench/gpu/run_all.sh --dry-run: the one-shot GPU suite's every case runs on CPU with tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu/run_all.sh"), "--dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    cases = {r["case"]: r for r in suite["results"]}
    assert suite["meta"]["dry_run"] is True
    assert {"rollout_sd15", "rollout_sdxl", "ddpo_learner_sd15", "alignprop_k50_sd15", "zero2_vs_zero3_sd15"} <= set(cases)
    assert all(r["status"] == "ok" for r in cases.values()), {k: r["status"] for k, r in cases.items()}
    for name in ("rollout_sd15", "rollout_sdxl"):  # same weights, same noise: fused fp32 ours = diffusers' images
        assert cases[name]["max_image_diff_uint8"] <= 1 and cases[name]["ratio"] > 0
    assert cases["ddpo_learner_sd15"]["step_s"] > 0 and abs(cases["ddpo_learner_sd15"]["ratio_mean"] - 1) < 0.1
    z = cases["zero2_vs_zero3_sd15"]
    assert z["zero2"]["step_s"] > 0 and z["zero3"]["step_s"] > 0 and z["zero2_freed"]
    md = (tmp_path / "suite.md").read_text()
    assert "DRY RUN" in md and md.count("| ok |") == len(cases)
