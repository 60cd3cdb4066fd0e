"""Run every CPU benchmark with small settings and write docs/benchmarks.md.

    python bench/run_all.py [--out docs/benchmarks.md] [--only e2e,rollout_vs_diffusers,...] [--quick]

Each bench runs in its own process (its own Ray cluster) and prints `RATIO <name> <value>`;
this collects those lines, the machine, and the exact commands into one Markdown table.
`--quick` runs every bench at tiny sizes (tests/test_bench_smoke.py: benches must not rot).
Exit status 1 if any bench failed or timed out.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEEP = "<!-- hand-written below: kept by bench/run_all.py -->"
BENCHES = {  # name: (argv, quick argv (CI smoke: tiny sizes, one repeat), what the ratio means, goal)
    "e2e": (["bench/e2e.py", "--epochs", "5", "--repeats", "3", "--threads", "1", "--plot", "docs/e2e_reward_vs_wallclock.png"],
            ["bench/e2e.py", "--epochs", "2", "--repeats", "1", "--steps", "2", "--batch", "2", "--batches-per-epoch", "1", "--threads", "1"],
            "end-to-end DDPO samples/s (rollout + reward + learn), raydiff on local Ray / single-process loop, equal threads", "≥ 1.0"),
    "rollout_vs_diffusers": (["bench/rollout_vs_diffusers.py", "--steps", "6", "--batch", "4", "--threads", "1"],
                             ["bench/rollout_vs_diffusers.py", "--steps", "2", "--batch", "1", "--threads", "1", "--repeats", "1"],
                             "images/s ours (with log-probs) / plain diffusers pipeline", "≥ 1.0"),
    "reward_serve": (["bench/reward_serve.py", "--seconds", "15", "--clients", "16", "--batch", "8", "--repeats", "2"],
                     ["bench/reward_serve.py", "--clip", "tiny", "--seconds", "1", "--warmup", "0.5", "--clients", "4", "--batch", "2", "--repeats", "1"],
                     "req/s: batched / max_batch_size=1 (HTTP, handle); handle / HTTP; Serve handle / same scorer in-process", "batched ≥ 5× unbatched (GPU); Serve ≥ 0.9× in-process"),
    "async_vs_sync": (["bench/async_vs_sync.py", "--epochs", "24", "--repeats", "2"],
                      ["bench/async_vs_sync.py", "--epochs", "3", "--repeats", "1", "--steps", "2", "--batch", "2", "--plot", "/tmp/raydiff-bench-quick-async.png"],
                      "wall-clock sync (staleness 0) / async (staleness 2): to equal updates, and to the sync runs' final reward", "≥ 1.5 on 2 CPU cores"),
    "weight_sync": (["bench/weight_sync.py", "--workers", "2", "--repeats", "5"],
                    ["bench/weight_sync.py", "--workers", "1", "--repeats", "1", "--steps", "2", "--batch", "2", "--modes", "lora"],
                    "publish → every rollout worker swapped / learner step (LoRA; full fine-tune in the output)", "≤ 0.02"),
    "dag_reward_calls": (["bench/dag_reward_calls.py", "--steps", "6", "--batch", "4", "--repeats", "5"],
                         ["bench/dag_reward_calls.py", "--steps", "2", "--batch", "2", "--repeats", "1"],
                         "decode + score of every step's x̂_0: concurrent per-step calls / the engine's chunked calls", "≥ 1.0"),
    "grad_memory": (["bench/grad_memory.py", "--steps", "6", "--batch", "2", "--resolution", "128", "--repeats", "2"],
                    ["bench/grad_memory.py", "--steps", "2", "--batch", "1", "--resolution", "64", "--repeats", "1"],
                    "peak memory of one K=all differentiable update, checkpointing off / on (each case its own process)", "> 1"),
}


def run(name: str, argv: list[str], timeout: float) -> tuple[str, float, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\nTIMEOUT after {timeout}s"
    ratios = re.findall(r"^RATIO (\S+) (\S+)$", out, re.M)
    value = "; ".join(f"{n} {float(v):.3f}" for n, v in ratios) or ("timeout" if "TIMEOUT" in out else "failed")
    keep = ("  ", "RATIO", "K=", "checkpointing=", "reward=", "steps=")
    details = "\n".join(line for line in out.splitlines() if line.startswith(keep) and "Warning" not in line)
    if value == "failed":
        details += "\n" + out[-3000:]
    return value, time.perf_counter() - t0, details


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--only", default=",".join(BENCHES))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks every bench still runs (CI), figures meaningless")
    args = p.parse_args(argv)
    m = machine()
    rows, sections, failed = [], [], []
    for name in args.only.split(","):
        full, quick, meaning, goal = BENCHES[name]
        argv_ = quick if args.quick else full
        print(f"== {name}", flush=True)
        value, wall, details = run(name, argv_, args.timeout)
        print(details or value, flush=True)
        if value in ("failed", "timeout"):
            failed.append(name)
        cmd = "python " + " ".join(argv_)
        rows.append(f"| {name} | `{cmd}` | {value} | {meaning} | {goal} | {wall:.0f} |")
        sections.append(f"### {name}\n\n```\n$ {cmd}\n{details}\n```\n")
    text = "\n".join([
        "# Benchmarks", "",
        f"Generated by `python bench/run_all.py` on {datetime.date.today()}: CPU **{m['cpu']}**, "
        f"{m['cores']} cores, torch {m['torch']}, GPU: {m['gpu'] or 'none'}. Tiny random models "
        "(`tiny://sd`), small settings: these ratios describe the code paths' overheads on a small, "
        "shared machine, not GPU throughput (see `bench/gpu/` for real-shape GPU benchmarks).", "",
        "| bench | command | ratio | meaning | goal | wall s |", "|---|---|---|---|---|---|", *rows, "",
        "## Outputs", "", *sections,
    ])
    out = Path(args.out)
    if out.is_file() and KEEP in out.read_text():  # hand-written notes below the marker survive regeneration
        text += "\n" + KEEP + out.read_text().split(KEEP, 1)[1]
    out.write_text(text)
    print(f"wrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
