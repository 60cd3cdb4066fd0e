"""The cases of bench/gpu/suite.py; each returns a JSON-able dict. `dry=True`: CPU, fp32, tiny shapes."""

from __future__ import annotations

import gc
import os
import statistics
import time

import torch

from _models import ARCH, TINY, build_model, random_cond, unet_tflop

PEAK = {"h100": 989.0, "h200": 989.0, "h800": 989.0, "a100": 312.0}


def _env(arch: str, dry: bool):
    dev = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    if not dry and dev == "cpu":
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    return (TINY[arch] if dry else arch), dev, ("float32" if dry else "bfloat16")


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _peak_reset(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(dev: str):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None


def _peak_tflops() -> float:
    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK.items() if k in name), 989.0)


def _spread(xs: list[float]) -> list[float]:
    return [round(min(xs), 3), round(statistics.median(xs), 3), round(max(xs), 3)]


def rollout(arch: str, batch: int, steps: int, repeats: int, dry: bool = False, guidance: float = 5.0) -> dict:
    """Ours (fused LoRA, channels_last, compile on GPU) vs StableDiffusion(XL)Pipeline on a fresh, plain module."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from raydiff.engine.compile import apply_speedups
    from raydiff.models.lora_fuse import RolloutWeights
    from raydiff.sampling.sampler import sample

    a, dev, dt = _env(arch, dry)
    ours = build_model(a, None, dt, dev)
    base = build_model(a, None, dt, dev)  # same seed: same weights; never compiled or fused
    RolloutWeights(ours.unet, fuse=True)
    levers = type("Levers", (), {"channels_last": not dry, "compile": not dry})()
    apply_speedups(ours, levers)
    cond = random_cond(ours, a, batch)
    cond_b = random_cond(base, a, batch)
    if "sdxl" in a:
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                         unet=base.unet, scheduler=base.scheduler)
        kw = dict(prompt_embeds=cond_b.embeds, negative_prompt_embeds=cond_b.neg_embeds, pooled_prompt_embeds=cond_b.pooled,
                  negative_pooled_prompt_embeds=cond_b.neg_pooled)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=None, tokenizer=None, unet=base.unet, scheduler=base.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        kw = dict(prompt_embeds=cond_b.embeds, negative_prompt_embeds=cond_b.neg_embeds)
    pipe.set_progress_bar_config(disable=True)

    def run_ours(seed):
        return sample(ours, cond, [""] * batch, steps, guidance, 1.0, torch.Generator(dev).manual_seed(seed)).images

    def run_base(seed):
        with torch.no_grad():
            img = pipe(num_inference_steps=steps, guidance_scale=guidance, eta=1.0, output_type="np", height=base.resolution,
                       width=base.resolution, generator=torch.Generator(dev).manual_seed(seed), **kw).images
        return (img * 255).round().astype("uint8")

    def ips(fn, seed):
        _sync(dev)
        t0 = time.perf_counter()
        fn(seed)
        _sync(dev)
        return batch / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    run_ours(0)  # warm-up (compile)
    warm_s = time.perf_counter() - t0
    run_base(0)
    a_s, b_s = [], []
    for r in range(repeats):  # interleaved
        b_s.append(ips(run_base, r + 1))
        a_s.append(ips(run_ours, r + 1))
    diff = int(abs(run_ours(7).astype(int) - run_base(7).astype(int)).max())
    arch_cfg = ARCH[a]
    tf_img = 2 * steps * unet_tflop(a, ours.resolution) + arch_cfg["vae_tflop"] * (ours.resolution / arch_cfg["resolution"]) ** 2
    med = statistics.median(a_s)
    return {"arch": a, "batch": batch, "steps": steps, "device": dev, "ours_img_s": _spread(a_s), "diffusers_img_s": _spread(b_s),
            "ours_img_s_med": round(med, 3), "diffusers_img_s_med": round(statistics.median(b_s), 3),
            "ratio": round(statistics.median(x / y for x, y in zip(a_s, b_s)), 3), "max_image_diff_uint8": diff,
            "warmup_s": round(warm_s, 1), "tflop_per_image": round(tf_img, 1), "achieved_tflops": round(med * tf_img, 1),
            "mfu": round(med * tf_img / _peak_tflops(), 4), "levers": "fused LoRA" + ("" if dry else " + channels_last + compile")}


def ddpo_step(arch: str, batch: int, steps: int, trained: int, dry: bool = False, guidance: float = 5.0) -> dict:
    """One DDPO update: `trained` timesteps re-scored by raydiff's Policy (no per-step host syncs), PPO loss, AdamW."""
    from raydiff.algorithms.common import StepAverager, decoupled_ppo_loss
    from raydiff.sampling.policy import Policy
    from raydiff.sampling.sampler import sample

    a, dev, dt = _env(arch, dry)
    model = build_model(a, None, dt, dev)
    cond = random_cond(model, a, batch)
    traj = sample(model, cond, [""] * batch, steps, guidance, 1.0, torch.Generator(dev).manual_seed(0))
    policy = Policy(model)
    adv = torch.randn(batch, device=dev)
    behaviour = traj.log_probs.to(dev)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-4)
    model.unet.train()

    def step():
        avg = StepAverager(trained)
        for j in range(trained):
            loss, stats = decoupled_ppo_loss(policy.log_prob(traj, j), behaviour[:, j], behaviour[:, j], adv, 1e-4, 2.0)
            loss.backward()
            avg.add({"loss": loss.detach(), **stats})
        opt.step()
        opt.zero_grad(set_to_none=True)
        return avg.result()

    step()
    _peak_reset(dev)
    t0 = time.perf_counter()
    metrics = step()
    _sync(dev)
    dt_s = time.perf_counter() - t0
    tflop = 2 * batch * 2 * trained * unet_tflop(a, model.resolution)  # CFG: 2 calls; fwd + LoRA bwd ≈ 2x fwd
    return {"arch": a, "batch": batch, "trained_steps": trained, "device": dev, "step_s": round(dt_s, 3), "peak_gib": _peak_gib(dev),
            "achieved_tflops": round(tflop / dt_s, 1), "mfu": round(tflop / dt_s / _peak_tflops(), 4),
            "ratio_mean": round(metrics["ratio_mean"], 6)}


def alignprop(arch: str, batch: int, steps: int, k: int, dry: bool = False, guidance: float = 5.0) -> dict:
    """Full-chain differentiable sampling, last K steps with grad, checkpointed UNet and VAE: time and peak memory."""
    from raydiff.sampling.differentiable import decode_with_grad, last_k, sample_with_grad

    a, dev, dt = _env(arch, dry)
    model = build_model(a, None, dt, dev)
    model.unet.enable_gradient_checkpointing()
    cond = random_cond(model, a, batch)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.unet.train()

    def step():
        out = sample_with_grad(model, cond, last_k(steps, k), guidance, eta=0.0,
                               generator=torch.Generator(dev).manual_seed(0), checkpointing=True)
        loss = -decode_with_grad(model, out.latents, checkpointing=True).mean()  # stand-in differentiable reward
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _peak_reset(dev)
    t0 = time.perf_counter()
    step()
    _sync(dev)
    return {"arch": a, "batch": batch, "steps": steps, "k": k, "device": dev, "step_s": round(time.perf_counter() - t0, 3),
            "peak_gib": _peak_gib(dev)}


def _zero(a: str, dev: str, dt: str, batch: int, repeats: int, stage: int) -> dict:
    import deepspeed

    model = build_model(a, None, dt, dev, lora_rank=None)
    unet = model.unet.float().requires_grad_(True).train()  # fp32 master weights; bf16 compute via DeepSpeed on GPU
    conf = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "bf16": {"enabled": dev == "cuda"},
            "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}}  # no FusedAdam JIT build
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=[p for p in unet.parameters() if p.requires_grad], config=conf)
    cdt = torch.bfloat16 if dev == "cuda" else torch.float32
    cond = random_cond(model, a, batch)
    h = model.latent_size
    added = None if cond.pooled is None else {"text_embeds": cond.pooled.to(cdt), "time_ids": cond.time_ids.to(cdt)}

    def step():
        x = torch.randn(batch, 4, h, h, device=dev, dtype=cdt)
        t = torch.randint(0, 1000, (batch,), device=dev)
        out = engine(x, t, encoder_hidden_states=cond.embeds.to(cdt), added_cond_kwargs=added, return_dict=False)[0]
        engine.backward(torch.nn.functional.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32)))
        engine.step()

    step()
    _peak_reset(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(dev)
    res = {"step_s": round((time.perf_counter() - t0) / repeats, 3), "peak_gib": _peak_gib(dev)}
    engine.destroy()  # free ZeRO-2's partitions and optimizer state before ZeRO-3 is measured
    del engine, unet, model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return res


def zero_stages(arch: str, batch: int, repeats: int, dry: bool = False) -> dict:
    """Full-UNet denoising step under DeepSpeed ZeRO-2, then ZeRO-3, one rank; ZeRO-2's engine freed in between."""
    from raydiff.engine.learners.deepspeed_stepper import init_distributed

    a, dev, dt = _env(arch, dry)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    init_distributed(dev == "cuda")
    z2 = _zero(a, dev, dt, batch, repeats, 2)
    after_free = _peak_gib(dev) if dev == "cuda" and torch.cuda.memory_allocated() < 2**30 else None
    z3 = _zero(a, dev, dt, batch, repeats, 3)
    res = {"arch": a, "batch": batch, "device": dev, "zero2": z2, "zero3": z3, "zero2_freed": after_free is not None or dev == "cpu",
           "time_ratio_z3_over_z2": round(z3["step_s"] / z2["step_s"], 3)}
    if z2["peak_gib"]:
        res["memory_ratio_z3_over_z2"] = round(z3["peak_gib"] / z2["peak_gib"], 3)
    return res
