"""One-shot GPU suite: every case in its own process and timeout; JSON + a markdown table with MFU and goals.

    python bench/gpu/suite.py [--dry-run] [--out bench/gpu/results]    (bench/gpu/run_all.sh calls this)

Cases (real shapes, random weights, bf16, built on the GPU): rollout SD1.5 b16×50 and SDXL b4×30
vs diffusers (interleaved; fused LoRA + compile on ours only, the baseline a fresh module with
live LoRA), the DDPO learner step (raydiff's Policy re-scoring, PPO loss), AlignProp K=50 peak
memory (checkpointed), ZeRO-2 vs ZeRO-3 (torch_adam; ZeRO-2 freed first), bench/e2e.py if present.
`--dry-run`: the same code on CPU, fp32, tiny shapes (no compile), seconds per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# name, module:function, kwargs, timeout (s) on GPU. Sum of timeouts < 8 min with start-up.
CASES = [
    ("rollout_sd15", "cases:rollout", dict(arch="sd15", batch=16, steps=50, repeats=3), 150),
    ("rollout_sdxl", "cases:rollout", dict(arch="sdxl", batch=4, steps=30, repeats=2), 150),
    ("ddpo_learner_sd15", "cases:ddpo_step", dict(arch="sd15", batch=8, steps=50, trained=10), 60),
    ("alignprop_k50_sd15", "cases:alignprop", dict(arch="sd15", batch=1, steps=50, k=50), 60),
    ("zero2_vs_zero3_sd15", "cases:zero_stages", dict(arch="sd15", batch=4, repeats=3), 90),
]
DRY = {"batch": 2, "steps": 3, "repeats": 1, "k": 3, "trained": 2}  # --dry-run caps
GOALS = {  # PERFORMANCE.md §5/§7
    "rollout_sd15": ("goal 4: MFU >= 0.40 and >= 1.5x diffusers", lambda r: r.get("mfu", 0) >= 0.40 and r.get("ratio", 0) >= 1.5),
    "rollout_sdxl": ("goal 5: >= 0.85 img/s", lambda r: r.get("ours_img_s_med", 0) >= 0.85),
    "ddpo_learner_sd15": ("goal 9: MFU >= 0.30", lambda r: r.get("mfu", 0) >= 0.30),
    "alignprop_k50_sd15": ("goal 8: peak <= 15 GB at K=50", lambda r: isinstance(r.get("peak_gib"), float) and r["peak_gib"] * 1.0737 <= 15),
    "zero2_vs_zero3_sd15": ("ZeRO-3 memory < ZeRO-2 (1 GPU: overhead only)", lambda r: r.get("memory_ratio_z3_over_z2", 9) < 1.0),
    "e2e": ("goal 10/1: e2e >= 1.0x single process (GPU: >= 2x)", lambda r: r.get("ratio", 0) >= 1.0),
}


def run_case(name: str, target: str, kwargs: dict, timeout: float, dry: bool, out: Path) -> dict:
    """Run one case in a child process (a crash or hang costs only that case)."""
    res_file = out / f"{name}.json"
    res_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "suite.py"), "--child", target, "--kwargs", json.dumps(kwargs), "--result", str(res_file)]
    if dry:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
        status = "ok" if proc.returncode == 0 and res_file.exists() else f"failed rc={proc.returncode}"
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        status, log = f"timeout {timeout}s", err[-3000:]
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    res.update(case=name, status=status, wall_s=round(time.perf_counter() - t0, 1))
    (out / f"{name}.log").write_text(log)
    print(f"[{name}] {status} in {res['wall_s']} s", flush=True)
    return res


def e2e_case(dry: bool, out: Path) -> list[dict]:
    e2e = ROOT / "bench" / "e2e.py"
    if not e2e.exists():
        print("[e2e] bench/e2e.py not present: skipped", flush=True)
        return []
    size = (["--epochs", "2", "--repeats", "1", "--steps", "2", "--batch", "2", "--batches-per-epoch", "1"] if dry
            else ["--sd15-shapes", "--device", "cuda", "--steps", "20", "--batch", "8", "--epochs", "3", "--repeats", "2"])
    cmd = [sys.executable, str(e2e), "--json", "--threads", "1"] + size
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=150 if not dry else 300, capture_output=True, text=True, cwd=ROOT)
        lines = [ln[5:] for ln in proc.stdout.splitlines() if ln.startswith("JSON ")]
        res = json.loads(lines[-1]) if lines else {}
        status = "ok" if proc.returncode == 0 and res else f"failed rc={proc.returncode}"
    except subprocess.TimeoutExpired:
        res, status = {}, "timeout"
    res.update(case="e2e", status=status, wall_s=round(time.perf_counter() - t0, 1))
    print(f"[e2e] {status} in {res['wall_s']} s", flush=True)
    return [res]


def table(results: list[dict], meta: dict) -> str:
    keys = ["ours_img_s_med", "diffusers_img_s_med", "ratio", "step_s", "peak_gib", "achieved_tflops", "mfu",
            "time_ratio_z3_over_z2", "memory_ratio_z3_over_z2"]
    lines = [f"GPU suite ({'DRY RUN: CPU, tiny shapes, figures meaningless' if meta['dry_run'] else meta['gpu']}), "
             f"{meta['date']}, total {meta['total_s']} s", "",
             "| case | status | " + " | ".join(keys) + " | goal | met |", "|" + "---|" * (len(keys) + 4)]
    for r in results:
        goal, check = GOALS.get(r["case"], ("", lambda _: False))
        met = ("yes" if check(r) else "no") if r["status"] == "ok" else "-"
        lines.append(f"| {r['case']} | {r['status']} | " + " | ".join(str(r.get(k, "")) for k in keys) + f" | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny shapes: exercise every code path")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import importlib

        mod, fn = args.child.split(":")
        kw = json.loads(args.kwargs)
        res = getattr(importlib.import_module(mod), fn)(dry=args.dry_run, **kw)
        Path(args.result).write_text(json.dumps(res))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    only = set(filter(None, args.only.split(",")))
    results = []
    for name, target, kw, timeout in CASES:
        if only and name not in only:
            continue
        if args.dry_run:
            kw = {k: (min(v, DRY[k]) if k in DRY else v) for k, v in kw.items()}
        results.append(run_case(name, target, kw, timeout * (3 if args.dry_run else 1), args.dry_run, out))
    if not only or "e2e" in only:
        results += e2e_case(args.dry_run, out)
    import torch

    meta = {"dry_run": args.dry_run, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "total_s": round(time.perf_counter() - t0, 1)}
    (out / "suite.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = table(results, meta)
    (out / "suite.md").write_text(md)
    print(md)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
