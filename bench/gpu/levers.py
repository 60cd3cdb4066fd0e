"""Before/after of one speed lever (model.compile or model.channels_last) on rollout sampling.

    python bench/gpu/levers.py compile [--model tiny://sd] [--steps 6] [--batch 4] [--repeats 5]
    python bench/gpu/levers.py channels_last ...

Two models loaded from the same config and seed (equal weights, fused LoRA on both), one with the
lever: `ModelSection(compile=True)` / `channels_last=True`, applied by raydiff.engine.compile.
Warm-up (compilation) is timed apart; then interleaved repeats, min / median / max images/s,
`RATIO <lever>_after_over_before` = median of adjacent-pair ratios. Runs on CPU (tiny model) or GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import device, machine, model_flags, report  # noqa: E402


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("lever", choices=["compile", "channels_last"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from raydiff.config import ModelSection
    from raydiff.models.loader import load_model
    from raydiff.models.lora_fuse import RolloutWeights
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.sampler import sample

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device(args.device)
    models = {}
    for side in ("before", "after"):
        torch.manual_seed(0)
        m = load_model(ModelSection(path=args.model, resolution=args.resolution, dtype=args.dtype,
                                    **({args.lever: True} if side == "after" else {})), dev)
        RolloutWeights(m.unet, fuse=True)
        models[side] = m
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]

    def run(m, seed):
        gen = torch.Generator(dev).manual_seed(seed)
        return sample(m, encode_prompts(m, prompts, ""), prompts, args.steps, 5.0, 1.0, gen).images

    def timed(m, seed):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(m, seed)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = {k: round(timed(m, 0), 2) for k, m in models.items()}
    ips = {k: [] for k in models}
    for r in range(args.repeats):
        for k, m in models.items():
            ips[k].append(args.batch / timed(m, r + 1))
    diff = int(np.abs(run(models["before"], 9).astype(int) - run(models["after"], 9).astype(int)).max())
    spread = {k: [round(min(v), 3), round(statistics.median(v), 3), round(max(v), 3)] for k, v in ips.items()}
    result = {"machine": machine(), "model": args.model, "steps": args.steps, "batch": args.batch, "lever": args.lever,
              "warmup_s": warm, "before_images_per_s_min_med_max": spread["before"],
              "after_images_per_s_min_med_max": spread["after"], "max_image_diff": diff,
              "ratio": statistics.median(a / b for a, b in zip(ips["after"], ips["before"]))}
    report(f"{args.lever}_after_over_before", result, args.json)
    return result


if __name__ == "__main__":
    main()
