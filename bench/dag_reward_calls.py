"""DAG intermediate rewards over Serve: chunked calls (the engine) vs one concurrent call per step, decode included.

    python bench/dag_reward_calls.py [--steps 6] [--batch 4] [--reward brightness] [--repeats 5]

DAG (raydiff/algorithms/dag.py) needs r(decode(x̂_0(x_t))) at every step t. RolloutWorker
decodes the N×T predictions in rollout.decode_chunk pieces and sends each piece to scoring as soon
as it is decoded (here `--decode-chunk`, default N×T: one call). The alternative a user would
write decodes step by step and sends one call per step *concurrently* (threads), so Serve's
@serve.batch can merge them. Both are timed from the stored x̂_0 latents (VAE decode included) to
all scores back, through the same Serve handles (HandleRewards), interleaved (order alternates),
one warm-up each; median (min, max) printed. Ratio: median per-step time / median engine time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device, machine, model_flags, report, spread  # noqa: E402


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=6, batch=4)
    p.add_argument("--reward", default="brightness", help="served reward (brightness, clip_score, ...)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (sampling, VAE decode)")
    p.add_argument("--decode-chunk", type=int, default=None, help="latents per VAE call on the engine side (default N×T)")
    args = p.parse_args(argv)
    import numpy as np
    import ray
    import torch

    from raydiff.config import ModelSection
    from raydiff.models.loader import load_model
    from raydiff.rewards.client import ensure_reward_service
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.sampler import decode_images, sample

    torch.set_num_threads(args.threads)
    dev = device(args.device)
    model = load_model(ModelSection(path=args.model, resolution=args.resolution), dev)
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]
    traj = sample(model, encode_prompts(model, prompts, ""), prompts, args.steps, 5.0, 1.0,
                  torch.Generator(dev).manual_seed(0), keep_x0=True, x0_guidance="cond")
    x0 = traj.extras["x0_pred"]  # (N, T, C, h, w)
    N, T = x0.shape[:2]
    chunk = args.decode_chunk or N * T

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rewards = ensure_reward_service([(args.reward, 1.0)], app_name="bench-dag-rewards")
    flat_prompts = [p for p in prompts for _ in range(T)]
    pool = ThreadPoolExecutor(max_workers=max(T, 2))

    def engine():  # RolloutWorker._intermediate_jobs: decode chunk by chunk, each chunk scored as soon as it exists
        flat = x0.flatten(0, 1)
        futures = [pool.submit(rewards, decode_images(model, flat[i:i + chunk].to(model.device, model.dtype)), flat_prompts[i:i + chunk])
                   for i in range(0, N * T, chunk)]
        return np.concatenate([np.asarray(f.result()[0]) for f in futures]).reshape(N, T), len(futures)

    def per_step():  # decode step t, send its call at once; T calls in flight together
        futures = [pool.submit(rewards, decode_images(model, x0[:, t].to(model.device, model.dtype)), prompts) for t in range(T)]
        return np.stack([np.asarray(f.result()[0]) for f in futures], axis=1), T

    times = {"engine": [], "per_step": []}
    outs, calls = {}, {}
    for name, fn in (("engine", engine), ("per_step", per_step)):
        outs[name], calls[name] = fn()  # warm-up
    for rep in range(args.repeats):
        for name in (("engine", "per_step") if rep % 2 == 0 else ("per_step", "engine")):
            t0 = time.perf_counter()
            (engine if name == "engine" else per_step)()
            times[name].append(time.perf_counter() - t0)
    from ray import serve

    serve.delete("bench-dag-rewards")
    ray.shutdown()
    me, mp = statistics.median(times["engine"]), statistics.median(times["per_step"])
    result = {"machine": machine(), "N": N, "T": T, "reward": args.reward, "decode_chunk": chunk,
              "engine_s": spread(times["engine"], " s"), "engine_calls": calls["engine"],
              "per_step_concurrent_s": spread(times["per_step"], " s"), "per_step_calls": calls["per_step"],
              "same_scores": bool(np.allclose(outs["engine"], outs["per_step"], atol=1e-4)), "ratio": mp / me}
    report("dag_reward_calls", result, args.json)
    return result


if __name__ == "__main__":
    main()
