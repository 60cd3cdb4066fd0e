"""GPU rollout images/s at real shapes (random weights), vs plain diffusers, and achieved TFLOP/s (MFU).

    python bench/gpu/rollout_throughput.py --arch sd15 --batch 16 --steps 50
    python bench/gpu/rollout_throughput.py --arch sdxl --batch 4 --steps 30

MFU = (2·steps UNet calls (CFG) + VAE decode) FLOPs per image × images/s / GPU peak (H100 bf16: 989).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _models import ARCH, build_model, gpu_flags, peak_tflops, random_cond, require_gpu, unet_tflop  # noqa: E402


def main(argv=None) -> dict:
    p = gpu_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), batch=16, steps=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    require_gpu(args.device)
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from raydiff.sampling.sampler import sample

    model = build_model(args.arch, args.resolution, args.dtype, args.device)
    if args.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if args.compile:
        model.unet = torch.compile(model.unet)
    cond = random_cond(model, args.arch, args.batch)
    prompts = [""] * args.batch
    if args.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                         unet=model.unet, scheduler=model.scheduler)
        kw = dict(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.neg_embeds, pooled_prompt_embeds=cond.pooled,
                  negative_pooled_prompt_embeds=cond.neg_pooled)
    else:
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet, scheduler=model.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        kw = dict(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.neg_embeds)
    pipe.set_progress_bar_config(disable=True)

    def ours(seed):
        return sample(model, cond, prompts, args.steps, args.guidance, 1.0, torch.Generator(args.device).manual_seed(seed)).images

    def diffusers(seed):
        with torch.no_grad():
            return pipe(num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, output_type="np",
                        height=model.resolution, width=model.resolution, generator=torch.Generator(args.device).manual_seed(seed), **kw).images

    def ips(fn):
        fn(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for r in range(args.repeats):
            fn(r + 1)
        torch.cuda.synchronize()
        return args.repeats * args.batch / (time.perf_counter() - t0)

    a, b = ips(ours), ips(diffusers)
    a_ = ARCH[args.arch]
    tf_img = 2 * args.steps * unet_tflop(args.arch, model.resolution) + a_["vae_tflop"] * (model.resolution / a_["resolution"]) ** 2
    peak = peak_tflops(args)
    res = {"gpu": torch.cuda.get_device_name(0), "arch": args.arch, "resolution": model.resolution, "batch": args.batch,
           "steps": args.steps, "ours_img_s": round(a, 3), "diffusers_img_s": round(b, 3), "ratio": round(a / b, 3),
           "tflop_per_image": round(tf_img, 1), "achieved_tflops": round(a * tf_img, 1), "peak_tflops": peak,
           "mfu": round(a * tf_img / peak, 4)}
    for k, v in res.items():
        print(f"{k}: {v}")
    print(f"RATIO rollout_vs_diffusers_gpu {a / b:.3f}")
    return res


if __name__ == "__main__":
    main()
