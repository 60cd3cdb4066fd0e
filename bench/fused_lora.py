"""Rollout sampling with the LoRA merged into the weights (rollout.fuse_lora) vs live peft adapters.

    python bench/fused_lora.py [--model tiny://sd] [--steps 6] [--batch 4] [--repeats 5]

One model, one non-zero LoRA; the two sides differ only in `RolloutWeights.fuse()` /
`unfuse()` (bit-exact restore, checked by checksum). Repeats are interleaved (live, fused,
live, ...) so background load hits both alike; min / median / max images/s are printed.
Images-equal check: max |Δ| of the uint8 images (≤ 1 = equal within fp32/bf16 rounding) and
max |Δ| of the log-probs. `RATIO fused_vs_live_lora` = median over repeats of fused / live of adjacent runs (robust to
load drifting on a shared machine; goal ≥ 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device, machine, model_flags, report  # noqa: E402


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5, help="timed batches per side, interleaved (after one warm-up each)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lora-rank", type=int, default=4)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from raydiff.config import LoraSection, ModelSection
    from raydiff.models.loader import load_model
    from raydiff.models.lora import state_checksum
    from raydiff.models.lora_fuse import RolloutWeights
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.sampler import sample

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device(args.device)
    torch.manual_seed(0)
    model = load_model(ModelSection(path=args.model, resolution=args.resolution, dtype=args.dtype,
                                    lora=LoraSection(rank=args.lora_rank, alpha=args.lora_rank)), dev)
    with torch.no_grad():  # a trained-looking, non-zero LoRA
        for n, prm in model.unet.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    weights = RolloutWeights(model.unet, fuse=True)
    weights.unfuse()
    base_sum = weights.checksum_base()
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]

    def run(seed):
        gen = torch.Generator(dev).manual_seed(seed)
        cond = encode_prompts(model, prompts, "")
        return sample(model, cond, prompts, args.steps, args.guidance, 1.0, gen)

    def timed(seed):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(seed)
        if dev == "cuda":
            torch.cuda.synchronize()
        return args.batch / (time.perf_counter() - t0)

    sides = {"live": weights.unfuse, "fused": weights.fuse}
    ips = {k: [] for k in sides}
    for k, setup in sides.items():  # warm-up
        setup()
        run(0)
    for r in range(args.repeats):
        for k, setup in sides.items():
            setup()
            ips[k].append(timed(r + 1))
    weights.fuse()
    a = run(99)
    weights.unfuse()
    b = run(99)
    restored = weights.checksum_base() == base_sum
    img_diff = int(np.abs(a.images.astype(int) - b.images.astype(int)).max())
    lp_diff = float((a.log_probs - b.log_probs).abs().max())
    spread = {k: [round(min(v), 3), round(statistics.median(v), 3), round(max(v), 3)] for k, v in ips.items()}
    print(f"images-equal: max |uint8 diff| {img_diff} (<= 1: {img_diff <= 1}), max |log-prob diff| {lp_diff:.2e}, "
          f"base weights restored bit-exactly: {restored}")
    result = {"machine": machine(), "model": args.model, "resolution": model.resolution, "steps": args.steps,
              "batch": args.batch, "dtype": str(model.dtype), "lora_layers": len(weights.layers),
              "live_images_per_s_min_med_max": spread["live"], "fused_images_per_s_min_med_max": spread["fused"],
              "max_image_diff": img_diff, "max_log_prob_diff": lp_diff, "images_equal": img_diff <= 1,
              "base_restored": restored, "base_checksum": base_sum[:16], "lora_checksum": state_checksum(
                  {n: q for n, q in model.unet.named_parameters() if q.requires_grad})[:16],
              "pair_ratios": [round(f / v, 3) for f, v in zip(ips["fused"], ips["live"])],
              "ratio": statistics.median(f / v for f, v in zip(ips["fused"], ips["live"]))}
    report("fused_vs_live_lora", result, args.json)
    return result


if __name__ == "__main__":
    main()
