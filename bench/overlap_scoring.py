"""Rollouts blocked on scores: time/reward_wait_s with rollout.overlap_scoring false vs true, same config.

    python bench/overlap_scoring.py [--config configs/tiny_dag.yaml] [--epochs 4] [key=value ...]

Trains the same config twice on one local Ray cluster with the rewards on Ray Serve
(reward.backend=serve, deployed by the trainer): once with every rollout batch waiting for
its scores before the next one samples, once with scoring of batch i overlapping sampling of
batch i+1 (RolloutGroup issues `start` of i+1 before `finish` of i). Prints, per setting, the
mean per epoch of time/reward_wait_s (seconds rollout workers sat blocked on scores, summed
over the epoch's batches) and time/epoch_s, epoch 0 (model loading, warm-up) left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def run(config: str, epochs: int, overlap: bool, extra: list[str]) -> dict:
    from raydiff.config import load_config
    from raydiff.engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench-overlap-")
    cfg = load_config(config, [f"output.run_dir={run_dir}", "output.progress=false", "output.tensorboard=false",
                               "output.image_grid_every=0", "output.experience_records=false", "output.checkpoint_every=0",
                               f"train.num_epochs={epochs}", "reward.backend=serve", f"rollout.overlap_scoring={str(overlap).lower()}",
                               *extra])
    Trainer(cfg).run()
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"overlap_scoring": overlap, "reward_wait_s": mean("time/reward_wait_s"), "epoch_s": mean("time/epoch_s"),
            "reward_s": mean("time/reward_s"), "sample_s": mean("time/sample_s")}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_dag.yaml")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    results = [run(args.config, args.epochs, overlap, args.overrides) for overlap in (False, True)]
    print(f"machine: {machine()}")
    for r in results:
        print(f"rollout.overlap_scoring={str(r['overlap_scoring']).lower():5s}  time/reward_wait_s {r['reward_wait_s']:.4f}  "
              f"time/epoch_s {r['epoch_s']:.2f}  (time/reward_s {r['reward_s']:.3f}, time/sample_s {r['sample_s']:.2f}; means over epochs 1..)")
    ray.shutdown()
    return results


if __name__ == "__main__":
    main()
