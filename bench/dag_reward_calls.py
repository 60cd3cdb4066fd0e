"""DAG intermediate rewards over Serve: one batched call for all T steps vs one call per step.

    python bench/dag_reward_calls.py [--steps 6] [--batch 4] [--reward brightness]

DAG (raydiff/algorithms/dag.py) needs r(decode(x̂_0(x_t))) at every step t. RolloutWorker
decodes the N×T predictions in rollout.decode_chunk pieces and scores them as they come (here: ONE call);
the naive way calls the reward once per step. This samples one trajectory batch with
keep_x0 on the tiny model, decodes x̂_0 once, then times both ways of scoring through the same
Serve handles (HandleRewards). Prints seconds and call counts, and the ratio per-step / batched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device, machine, model_flags, report  # noqa: E402


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=6, batch=4)
    p.add_argument("--reward", default="brightness", help="served reward (brightness, clip_score, ...)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import numpy as np
    import ray
    import torch

    from raydiff.config import ModelSection
    from raydiff.models.loader import load_model
    from raydiff.rewards.client import ensure_reward_service
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.sampler import decode_images, sample

    dev = device(args.device)
    model = load_model(ModelSection(path=args.model, resolution=args.resolution), dev)
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]
    traj = sample(model, encode_prompts(model, prompts, ""), prompts, args.steps, 5.0, 1.0,
                  torch.Generator(dev).manual_seed(0), keep_x0=True, x0_guidance="cond")
    x0 = traj.extras["x0_pred"]  # (N, T, C, h, w)
    N, T = x0.shape[:2]
    images = decode_images(model, x0.flatten(0, 1).to(model.device, model.dtype)).reshape(N, T, *traj.images.shape[1:])

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rewards = ensure_reward_service([(args.reward, 1.0)], app_name="bench-dag-rewards")
    flat_prompts = [p for p in prompts for _ in range(T)]

    def batched():  # one call for N×T images (RolloutWorker with decode_chunk >= N×T)
        total, _ = rewards(images.reshape(N * T, *images.shape[2:]), flat_prompts)
        return np.asarray(total).reshape(N, T), 1

    def per_step():  # one call per timestep, N images each
        return np.stack([np.asarray(rewards(images[:, t], prompts)[0]) for t in range(T)], axis=1), T

    def timed(fn):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out, calls = fn()
            best = min(best, time.perf_counter() - t0)
        return best, calls, out

    tb, cb, rb = timed(batched)
    tp, cp, rp = timed(per_step)
    from ray import serve

    serve.delete("bench-dag-rewards")
    ray.shutdown()
    result = {"machine": machine(), "N": N, "T": T, "batched_s": round(tb, 4), "batched_calls": cb,
              "per_step_s": round(tp, 4), "per_step_calls": cp, "same_scores": bool(np.allclose(rb, rp, atol=1e-5)),
              "ratio": tp / tb}
    report("dag_reward_calls", result, args.json)
    return result


if __name__ == "__main__":
    main()
