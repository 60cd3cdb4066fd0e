"""Weight-sync time vs learner step time, for LoRA and model.finetune=full.

    python bench/weight_sync.py [--workers 2] [--repeats 3]

Times what the training loop waits for: `Learner.publish` -> `RolloutGroup.push_weights` ->
every rollout actor has verified and swapped in the new weights (the same span the trainer logs
as `time/sync_s` at train.max_staleness=0), against one learner step (`Learner.train` on a real
rollout batch), alternating step and sync on a local Ray cluster. The checksum check that the
actors hold the pushed weights runs after the timed span. Prints median (min, max) of each and
the ratio of the medians sync/step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_flags, report, spread  # noqa: E402


def measure(finetune: str, args) -> dict:
    import ray

    from raydiff.algorithms.registry import make_algorithm
    from raydiff.config import load_config
    from raydiff.engine.learners.handle import LearnerHandle
    from raydiff.engine.rollouts.group import RolloutGroup

    ov = [f"model.path={args.model}", f"model.finetune={finetune}", f"sampling.num_steps={args.steps}",
          f"sampling.batch_size={args.batch}", f"algorithm.train_batch_size={args.batch}", "learner.engine=torch",
          f"rollout.num_workers={args.workers}", "rollout.num_cpus=0.5", "learner.num_cpus=0.5",
          f"output.run_dir={tempfile.mkdtemp(prefix='bench-sync-')}"]
    if args.resolution:
        ov.append(f"model.resolution={args.resolution}")
    cfg = load_config(args.config, ov)
    group, learner = RolloutGroup(cfg), LearnerHandle(cfg)
    try:
        batch = ray.get(group.actors[0].generate.remote(["a cat", "a dog"] * (args.batch // 2) or ["a cat"], 0))
        batch = make_algorithm(cfg.algorithm, cfg.sampling).prepare(batch)
        steps, syncs, size = [], [], 0
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            learner.train(batch)
            t1 = time.perf_counter()
            update = learner.publish()  # ref to {version, state, checksum}
            assert all(ray.get(group.push_weights(update))), "a rollout actor rejected the update"
            t2 = time.perf_counter()
            sums = group.checksums()  # outside the timed span
            want = ray.get(update)["checksum"]
            assert all(c == want for _, c in sums), "rollout actors do not hold the pushed weights"
            if r:  # first round is warm-up
                steps.append(t1 - t0)
                syncs.append(t2 - t1)
            size = sum(t.numel() * t.element_size() for t in ray.get(update)["state"].values())
        return {"sync_s": statistics.median(syncs), "step_s": statistics.median(steps), "sync_spread": spread(syncs, " s"),
                "step_spread": spread(steps, " s"), "payload_mb": round(size / 2**20, 2)}
    finally:
        group.shutdown()
        learner.shutdown()


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=4, batch=4)
    p.add_argument("--config", default="configs/tiny_ddpo.yaml")
    p.add_argument("--workers", type=int, default=2, help="rollout actors receiving the weights")
    p.add_argument("--repeats", type=int, default=5, help="timed step + sync rounds per mode (after one warm-up)")
    p.add_argument("--modes", default="lora,full")
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    result = {"machine": machine(), "rollout_workers": args.workers}
    for mode in args.modes.split(","):
        m = measure(mode, args)
        result[mode] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()} | {"sync_over_step": round(m["sync_s"] / m["step_s"], 4)}
    ray.shutdown()
    result["ratio"] = result[args.modes.split(",")[0]]["sync_over_step"]
    report("weight_sync_over_step", result, args.json)
    return result


if __name__ == "__main__":
    main()
