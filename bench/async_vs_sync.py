"""Async DDPO (train.max_staleness=S) vs sync (0) on one config: wall-clock to equal updates and to a reward target.

    python bench/async_vs_sync.py [--epochs 12] [--repeats 2] [--config configs/tiny_ddpo_async.yaml]

One Ray cluster; the reward service (Ray Serve, reward.backend=serve) is deployed before any
timing starts. Runs are interleaved and repeated (sync, async, async, sync, ...), each on the
same config except train.max_staleness. Reported:
- wall-clock to equal updates: each run's time from Trainer start to its last policy update;
- wall-clock to a reward target: target = mean over the sync runs of their last-3-epoch mean
  reward; a run reaches it at the first epoch whose 3-epoch moving average of reward/mean is
  ≥ target (time = that epoch's metrics timestamp − run start). Unreached: inf.
Spreads (min..max over repeats) are printed; a reward-vs-wall-clock plot goes to docs/.
Last line: `RATIO async_vs_sync_to_reward X` (mean sync time-to-target / mean async time-to-target).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_flags  # noqa: E402
from _plot import line_plot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(config: str, overrides: list[str]) -> dict:
    """One training run; per-epoch (seconds since start, reward) and the total wall-clock."""
    from raydiff.config import load_config
    from raydiff.engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench-async-")
    cfg = load_config(config, [f"output.run_dir={run_dir}", "output.progress=false", "output.tensorboard=false",
                               "output.image_grid_every=0", "output.experience_records=false", *overrides])
    t0 = time.time()
    Trainer(cfg).run()
    wall = time.time() - t0
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall": wall, "t": [r["time"] - t0 for r in rows], "reward": [r["reward/mean"] for r in rows],
            "staleness": [r.get("policy/staleness", 0) for r in rows]}


def moving_average(xs: list[float], k: int = 3) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def time_to(run: dict, target: float) -> float:
    """First epoch whose 3-epoch moving average reaches `target` (only full windows count)."""
    for i, m in enumerate(moving_average(run["reward"])):
        if i >= 2 and m >= target:
            return run["t"][i]
    return math.inf


def spread(xs: list[float]) -> str:
    return f"mean {statistics.fmean(xs):.1f} s (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=6, batch=8)
    p.add_argument("--config", default="configs/tiny_ddpo_async.yaml")
    p.add_argument("--epochs", type=int, default=12, help="policy updates per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode (interleaved)")
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--engine", default="torch", help="learner.engine (torch is faster to start on CPU)")
    p.add_argument("--plot", default=str(ROOT / "docs" / "async_vs_sync.png"))
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for both modes")
    args = p.parse_args(argv)
    import ray

    from raydiff.config import load_config
    from raydiff.rewards.client import ensure_reward_service

    common = [f"model.path={args.model}", f"sampling.num_steps={args.steps}", f"sampling.batch_size={args.batch}",
              f"train.num_epochs={args.epochs}", "rollout.torch_threads=1", "learner.torch_threads=1",
              f"learner.engine={args.engine}", *(["learner.num_workers=1"] if args.engine == "torch" else []),
              "reward.backend=serve", "output.checkpoint_every=0", *args.extra]
    if args.resolution:
        common.append(f"model.resolution={args.resolution}")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    cfg = load_config(args.config, common)
    ensure_reward_service(cfg.reward.components, cfg.reward.serve_app)  # deployed before any timing
    runs: dict[int, list[dict]] = {0: [], args.staleness: []}
    for rep in range(args.repeats):
        order = (0, args.staleness) if rep % 2 == 0 else (args.staleness, 0)
        for s in order:
            r = run(args.config, [*common, f"train.max_staleness={s}"])
            runs[s].append(r)
            print(f"  run S={s} rep={rep}: wall {r['wall']:.1f} s, rewards {[round(x, 4) for x in r['reward']]}", flush=True)
    ray.shutdown()

    sync, asyn = runs[0], runs[args.staleness]
    target = statistics.fmean(statistics.fmean(r["reward"][-3:]) for r in sync)
    upd_sync, upd_async = [r["t"][-1] for r in sync], [r["t"][-1] for r in asyn]
    tt_sync, tt_async = [time_to(r, target) for r in sync], [time_to(r, target) for r in asyn]
    mean_or_inf = lambda xs: statistics.fmean(xs) if all(math.isfinite(x) for x in xs) else math.inf
    ratio_updates = statistics.fmean(upd_sync) / statistics.fmean(upd_async)
    ratio_reward = (mean_or_inf(tt_sync) / mean_or_inf(tt_async)) if math.isfinite(mean_or_inf(tt_async)) else 0.0
    series = {}
    for s, rs in runs.items():
        for i, r in enumerate(rs):
            series[f"{'sync S=0' if s == 0 else f'async S={s}'} #{i}"] = (r["t"], moving_average(r["reward"]))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    line_plot(series, args.plot, f"reward (3-epoch moving avg) vs wall-clock, {args.epochs} updates",
              "wall-clock since run start [s]", "reward/mean", hline=target)
    result = {
        "machine": machine(), "epochs": args.epochs, "repeats": args.repeats, "reward_target": round(target, 5),
        "sync_to_equal_updates": spread(upd_sync), f"async_S{args.staleness}_to_equal_updates": spread(upd_async),
        "sync_to_reward": [round(x, 1) for x in tt_sync], f"async_S{args.staleness}_to_reward": [round(x, 1) for x in tt_async],
        "ratio_to_equal_updates": round(ratio_updates, 3), "plot": args.plot,
    }
    for k, v in result.items():
        print(f"  {k}: {v}")
    print(f"RATIO async_vs_sync_updates {ratio_updates:.3f}")
    print(f"RATIO async_vs_sync_to_reward {ratio_reward:.3f}")
    result["ratio"] = ratio_reward
    return result


if __name__ == "__main__":
    main()
