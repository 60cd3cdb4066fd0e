"""Async DDPO (train.max_staleness=2) vs sync (0): wall-clock to the same number of policy updates.

    python bench/async_vs_sync.py [--epochs 4] [--config configs/tiny_ddpo_async.yaml]

Same tiny DDPO config both times; every role on one torch thread (rollout.torch_threads=1,
learner.torch_threads=1), learner.engine=torch, rewards scored over Ray Serve
(reward.backend=serve) so reward latency is real. Prints each wall-clock and the ratio sync/async.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_flags, report  # noqa: E402


def run(config: str, overrides: list[str]) -> tuple[float, list[dict]]:
    from raydiff.config import load_config
    from raydiff.engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench-async-")
    cfg = load_config(config, [f"output.run_dir={run_dir}", "output.progress=false", "output.tensorboard=false",
                               "output.image_grid_every=0", "output.experience_records=false", *overrides])
    t0 = time.perf_counter()
    Trainer(cfg).run()
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return wall, metrics


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=6, batch=8)
    p.add_argument("--config", default="configs/tiny_ddpo_async.yaml")
    p.add_argument("--epochs", type=int, default=4, help="policy updates per run")
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--engine", default="torch", help="learner.engine (torch is faster to start on CPU)")
    args = p.parse_args(argv)
    import ray

    common = [f"model.path={args.model}", f"sampling.num_steps={args.steps}", f"sampling.batch_size={args.batch}",
              f"algorithm.train_batch_size={args.batch * 2}", f"train.num_epochs={args.epochs}",
              "rollout.torch_threads=1", "learner.torch_threads=1", f"learner.engine={args.engine}",
              *(["learner.num_workers=1"] if args.engine == "torch" else []),
              "reward.backend=serve", "output.checkpoint_every=0"]
    if args.resolution:
        common.append(f"model.resolution={args.resolution}")
    # One cluster for both runs, so the reward app and worker start-up are paid alike.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    walls = {}
    for s in (0, args.staleness):
        walls[s], _ = run(args.config, [*common, f"train.max_staleness={s}"])
    ray.shutdown()
    result = {"machine": machine(), "epochs": args.epochs, "sync_wall_s": round(walls[0], 2),
              f"async_staleness{args.staleness}_wall_s": round(walls[args.staleness], 2),
              "ratio": walls[0] / walls[args.staleness]}
    report("async_vs_sync", result, args.json)
    return result


if __name__ == "__main__":
    main()
