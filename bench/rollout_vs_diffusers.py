"""Rollout sampler (DDIM η=1 with per-step log-probs) vs a plain diffusers StableDiffusionPipeline call.

    python bench/rollout_vs_diffusers.py [--model tiny://sd] [--steps 6] [--batch 4] [--repeats 3]

Same model objects (UNet incl. its LoRA adapter, VAE, text encoder, DDIM scheduler), steps,
batch, CFG scale and seed; both decode to uint8. Prints images/s of each and the ratio
ours / diffusers (goal >= 1.0 on CPU: log-probs must cost nothing noticeable).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device, machine, model_flags, report  # noqa: E402


def main(argv=None) -> dict:
    p = model_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3, help="timed batches per side (after one warm-up each)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline

    from raydiff.config import ModelSection
    from raydiff.models.loader import load_model
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.sampler import sample

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device(args.device)
    model = load_model(ModelSection(path=args.model, resolution=args.resolution, dtype=args.dtype), dev)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]

    def ours(seed):
        gen = torch.Generator(dev).manual_seed(seed)
        cond = encode_prompts(model, prompts, "")
        return sample(model, cond, prompts, args.steps, args.guidance, 1.0, gen).images

    def diffusers(seed):
        gen = torch.Generator(dev).manual_seed(seed)
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, generator=gen,
                       height=model.resolution, width=model.resolution, output_type="np")
        return (out.images * 255).round().astype("uint8")

    def timed(fn):
        fn(0)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for r in range(args.repeats):
            fn(r + 1)
        if dev == "cuda":
            torch.cuda.synchronize()
        return args.repeats * args.batch / (time.perf_counter() - t0)

    # Interleave the two sides so background load on a shared machine hits both alike.
    ips_ours, ips_diff = [], []
    for _ in range(2):
        ips_diff.append(timed(diffusers))
        ips_ours.append(timed(ours))
    a, b = max(ips_ours), max(ips_diff)
    same = bool((ours(7) == diffusers(7)).all())
    result = {"machine": machine(), "model": args.model, "resolution": model.resolution, "steps": args.steps,
              "batch": args.batch, "ours_images_per_s": round(a, 3), "diffusers_images_per_s": round(b, 3),
              "identical_images": same, "ratio": a / b}
    report("rollout_vs_diffusers", result, args.json)
    return result


if __name__ == "__main__":
    main()
