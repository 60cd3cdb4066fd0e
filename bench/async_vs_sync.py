"""Async DDPO (train.max_staleness=S) vs sync (0) on one config: wall-clock to equal updates and to a reward target.

    python bench/async_vs_sync.py [--epochs 24] [--repeats 2] [--config configs/tiny_ddpo_async_bench.yaml]

One Ray cluster; the reward service (Ray Serve, reward.backend=serve) is deployed once, before
any run, and both modes use it. Runs are interleaved and repeated (sync, async, async, sync, ...),
each on the same config except train.max_staleness. Every time is measured from the start of a
run's training loop (the first epoch's start: roles started, first weights pushed), so actor
and learner start-up and the final checkpoint are outside it. Reported:
- wall-clock to equal updates: the time of each run's `--epochs`-th policy update;
- wall-clock to a reward target: target = mean over the sync runs of their last-3-epoch mean
  reward; a run reaches it at the first epoch whose 3-epoch moving average of reward/mean is
  ≥ target (time = that epoch's metrics timestamp). The async runs get `--async-epochs`
  updates (default `--epochs` + 2·S: their rollout rewards come from a policy S versions old),
  so that they can reach the target at all; unreached: inf.
- reward per policy version: the mean reward of the samples each version produced (async
  rewards shifted by their staleness), sync vs async, to separate learning per update from speed.
Spreads are min/median/max over the repeats; a reward-vs-wall-clock plot goes to docs/.
The default config (configs/tiny_ddpo_async_bench.yaml) gives the rollout actor and the learner
one thread each and balances their times (docs/benchmarks.md: on 2 cores with one thread per
role, k rollout actors and one learner, the per-update gain is bounded by 1.5 for k = 2, 2 for k = 1).
Last line: `RATIO async_vs_sync_to_reward X` (median sync time-to-target / median async time-to-target).
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
    """One training run: per epoch (seconds since its training loop started, reward, staleness)."""
    from raydiff.config import load_config
    from raydiff.engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench-async-")
    cfg = load_config(config, [f"output.run_dir={run_dir}", "output.progress=false", "output.tensorboard=false",
                               "output.image_grid_every=0", "output.experience_records=false", *overrides])
    t0 = time.time()
    Trainer(cfg).run()
    wall = time.time() - t0
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loop_start = rows[0]["time"] - rows[0]["time/epoch_s"]  # the first epoch's start: after start-up
    keys = ("policy/staleness", "train/clipfrac", "train/is_weight_mean", "train/is_truncated_frac", "train/behaviour_approx_kl",
            "time/learner_step_s", "time/learner_prepare_s", "time/rollout_wait_s")
    return {"wall": wall, "startup": loop_start - t0, "t": [r["time"] - loop_start for r in rows],
            "reward": [r["reward/mean"] for r in rows], "staleness": [int(r.get("policy/staleness", 0)) for r in rows],
            "means": {k: statistics.fmean(r.get(k, 0.0) for r in rows[1:]) for k in keys}}


def moving_average(xs: list[float], k: int = 3) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def time_to(run: dict, target: float) -> float:
    """First epoch whose 3-epoch moving average reaches `target` (only full windows count)."""
    for i, m in enumerate(moving_average(run["reward"])):
        if i >= 2 and m >= target:
            return run["t"][i]
    return math.inf


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.1f} s (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"


def by_version(run: dict) -> dict[int, float]:
    """Mean reward of the samples each policy version made (epoch e's batch came from version e − staleness)."""
    return {e - s: r for e, (r, s) in enumerate(zip(run["reward"], run["staleness"]))}


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=6, batch=8)
    p.add_argument("--config", default="configs/tiny_ddpo_async_bench.yaml")
    p.add_argument("--epochs", type=int, default=24, help="policy updates of a sync run (and the equal-updates point)")
    p.add_argument("--async-epochs", type=int, default=None, help="policy updates of an async run (default epochs + 2·S)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode (interleaved)")
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--engine", default="torch", help="learner.engine (torch is faster to start on CPU)")
    p.add_argument("--plot", default=str(ROOT / "docs" / "async_vs_sync.png"))
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for both modes")
    args = p.parse_args(argv)
    import ray

    from raydiff.config import load_config
    from raydiff.rewards.client import ensure_reward_service

    S = args.staleness
    epochs = {0: args.epochs, S: args.async_epochs or args.epochs + 2 * S}
    common = [f"model.path={args.model}", f"sampling.num_steps={args.steps}", f"sampling.batch_size={args.batch}",
              "rollout.torch_threads=1", "learner.torch_threads=1",  # one thread per role in both modes
              f"learner.engine={args.engine}", *(["learner.num_workers=1"] if args.engine == "torch" else []),
              "reward.backend=serve", "output.checkpoint_every=0", *args.extra]
    if args.resolution:
        common.append(f"model.resolution={args.resolution}")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    cfg = load_config(args.config, common)
    ensure_reward_service(cfg.reward.components, cfg.reward.serve_app)  # deployed once, before any run
    runs: dict[int, list[dict]] = {0: [], S: []}
    for rep in range(args.repeats):
        for s in ((0, S) if rep % 2 == 0 else (S, 0)):
            r = run(args.config, [*common, f"train.max_staleness={s}", f"train.num_epochs={epochs[s]}"])
            runs[s].append(r)
            print(f"  run S={s} rep={rep}: start-up {r['startup']:.1f} s (untimed), loop {r['t'][-1]:.1f} s, "
                  f"rewards {[round(x, 4) for x in r['reward']]}", flush=True)
            print(f"    means over epochs 1..: { {k: round(v, 4) for k, v in r['means'].items()} }", flush=True)
    ray.shutdown()

    sync, asyn = runs[0], runs[S]
    E = args.epochs
    target = statistics.fmean(statistics.fmean(r["reward"][E - 3:E]) for r in sync)
    upd_sync, upd_async = [r["t"][E - 1] for r in sync], [r["t"][E - 1] for r in asyn]
    tt_sync, tt_async = [time_to(r, target) for r in sync], [time_to(r, target) for r in asyn]
    med = statistics.median
    ratio_updates = med(upd_sync) / med(upd_async)
    if not math.isfinite(med(tt_sync)):  # sync's runs differ and one stays below their mean: nan, not inf
        ratio_reward = math.nan
    elif not math.isfinite(med(tt_async)):  # async never reaches the target
        ratio_reward = 0.0
    else:
        ratio_reward = med(tt_sync) / med(tt_async)
    v_sync, v_async = by_version(sync[0]), by_version(asyn[0])
    versions = [v for v in range(E) if v in v_async]
    series = {}
    for s, rs in runs.items():
        for i, r in enumerate(rs):
            series[f"{'sync S=0' if s == 0 else f'async S={s}'} #{i}"] = (r["t"], moving_average(r["reward"]))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    line_plot(series, args.plot, f"reward (3-epoch moving avg) vs wall-clock; sync {E}, async {epochs[S]} updates",
              "wall-clock since the training loop started [s]", "reward/mean", hline=target)
    gain = lambda v: statistics.fmean(v[x] for x in versions[-3:]) - statistics.fmean(v[x] for x in versions[:3])
    result = {
        "machine": machine(), "config": args.config, "epochs": epochs, "repeats": args.repeats,
        "reward_target": round(target, 5),
        "sync_to_equal_updates": spread(upd_sync), f"async_S{S}_to_equal_updates": spread(upd_async),
        "sync_to_reward": [round(x, 1) for x in tt_sync], f"async_S{S}_to_reward": [round(x, 1) for x in tt_async],
        "sync_to_reward_spread": spread(tt_sync),
        f"async_S{S}_to_reward_spread": spread(tt_async) if all(map(math.isfinite, tt_async)) else "unreached",
        f"reward_gain_per_version_0..{versions[-1]}": {"sync": round(gain(v_sync), 4), "async": round(gain(v_async), 4)},
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
