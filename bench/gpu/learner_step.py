"""GPU learner benchmarks at real shapes (random weights): DDPO step, AlignProp ± checkpointing.

    python bench/gpu/learner_step.py ddpo --arch sd15 --batch 8 --steps 50
    python bench/gpu/learner_step.py alignprop --arch sd15 --batch 1 --steps 50 --k 50

ddpo: one PPO-clipped update over all T timesteps of a stored trajectory batch (LoRA r4, CFG),
  time, peak memory and achieved TFLOP/s (≈ 2× forward FLOPs for LoRA backward).
alignprop: full-chain differentiable sampling (raydiff.sampling.differentiable, last K steps with
  grad) + VAE decode + a dummy differentiable reward, with and without gradient checkpointing:
  time and peak memory of each, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _models import build_model, gpu_flags, peak_tflops, random_cond, require_gpu, unet_tflop  # noqa: E402


def ddpo(args) -> dict:
    import torch

    from raydiff.sampling.ddim import ddim_step
    from raydiff.sampling.sampler import predict_noise, sample

    model = build_model(args.arch, args.resolution, args.dtype, args.device)
    cond = random_cond(model, args.arch, args.batch)
    traj = sample(model, cond, [""] * args.batch, args.steps, args.guidance, 1.0, torch.Generator(args.device).manual_seed(0))
    lat = traj.latents.to(args.device, model.dtype)
    old = traj.log_probs.to(args.device)
    adv = torch.randn(args.batch, device=args.device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-4)
    model.unet.train()

    def step():
        for i, t in enumerate(traj.timesteps.to(args.device)):
            eps = predict_noise(model, lat[:, i], t, cond, args.guidance)
            lp = ddim_step(model.scheduler, eps, t, lat[:, i], 1.0, prev_sample=lat[:, i + 1]).log_prob
            ratio = torch.exp(lp - old[:, i])
            loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt, peak = timed_step(step)
    tflop = 2 * args.batch * 2 * args.steps * unet_tflop(args.arch, model.resolution)  # CFG: 2 calls; fwd+LoRA bwd ≈ 2× fwd
    return {"step_s": round(dt, 3), "peak_gib": peak,
            "achieved_tflops": round(tflop / dt, 1), "mfu": round(tflop / dt / peak_tflops(args), 4)}


def timed_step(step) -> tuple[float, float]:
    """Warm-up step, then one timed step: (seconds, peak GiB allocated during it)."""
    import torch

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, round(torch.cuda.max_memory_allocated() / 2**30, 2)


def alignprop(args, checkpointing: bool) -> dict:
    import torch

    from raydiff.sampling.differentiable import decode_with_grad, last_k, sample_with_grad

    model = build_model(args.arch, args.resolution, args.dtype, args.device)
    cond = random_cond(model, args.arch, args.batch)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.unet.train()

    def step():
        out = sample_with_grad(model, cond, last_k(args.steps, args.k), args.guidance, eta=0.0,
                               generator=torch.Generator(args.device).manual_seed(0), checkpointing=checkpointing)
        img = decode_with_grad(model, out.latents, checkpointing=checkpointing)
        loss = -img.mean()  # stand-in differentiable reward (brightness)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        dt, peak = timed_step(step)
        return {"step_s": round(dt, 3), "peak_gib": peak}
    except torch.cuda.OutOfMemoryError:
        return {"step_s": None, "peak_gib": "OOM"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["ddpo", "alignprop"])
    gpu_flags(p, batch=8, steps=50)
    p.add_argument("--k", type=int, default=50, help="alignprop: steps with gradient (last K)")
    args = p.parse_args(argv)
    require_gpu(args.device)
    import torch

    if args.which == "ddpo":
        res = ddpo(args)
    else:
        on = alignprop(args, True)
        torch.cuda.empty_cache()  # the first model is gone with its frame
        off = alignprop(args, False)
        res = {"checkpointing": on, "no_checkpointing": off}
        if on["step_s"] and off["step_s"]:
            res["time_ratio_ckpt_over_plain"] = round(on["step_s"] / off["step_s"], 3)
            res["memory_ratio_ckpt_over_plain"] = round(on["peak_gib"] / off["peak_gib"], 3)
    res = {"gpu": torch.cuda.get_device_name(0), "arch": args.arch, "batch": args.batch, "steps": args.steps, **res}
    for k, v in res.items():
        print(f"{k}: {v}")
    return res


if __name__ == "__main__":
    main()
