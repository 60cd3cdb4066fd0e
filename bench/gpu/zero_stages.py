"""DeepSpeed ZeRO-2 vs ZeRO-3 on one GPU: full-UNet fine-tune step time and peak memory at real shapes.

    python bench/gpu/zero_stages.py --arch sd15 --batch 4
    torchrun --nproc_per_node 8 bench/gpu/zero_stages.py --arch sdxl --batch 2   # multi-GPU

Single process: a one-rank DeepSpeed group (MASTER_ADDR/PORT set here when absent); ZeRO-3
still partitions (over 1 rank) so the difference is its gather/release overhead. One denoising
MSE step (random x_t, t, ε target) on the full UNet, bf16, AdamW.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _models import build_model, gpu_flags, random_cond, require_gpu  # noqa: E402


def run(args, stage: int) -> dict:
    import deepspeed
    import torch

    model = build_model(args.arch, args.resolution, args.dtype, args.device, lora_rank=None)
    unet = model.unet.float().requires_grad_(True).train()  # fp32 master weights; bf16 compute via DeepSpeed
    conf = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
            "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=[p for p in unet.parameters() if p.requires_grad], config=conf)
    cond = random_cond(model, args.arch, args.batch)
    h = model.latent_size
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled.bfloat16(), "time_ids": cond.time_ids.bfloat16()}

    def step():
        x = torch.randn(args.batch, 4, h, h, device=args.device, dtype=torch.bfloat16)
        t = torch.randint(0, 1000, (args.batch,), device=args.device)
        out = engine(x, t, encoder_hidden_states=cond.embeds.bfloat16(), added_cond_kwargs=added, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32))
        engine.backward(loss)
        engine.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step()
    torch.cuda.synchronize()
    res = {"step_s": round((time.perf_counter() - t0) / args.repeats, 3), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return res


def main(argv=None) -> dict:
    p = gpu_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), batch=4, steps=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    require_gpu(args.device)
    import deepspeed
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    z2 = run(args, 2)
    torch.cuda.empty_cache()
    z3 = run(args, 3)
    res = {"gpu": torch.cuda.get_device_name(0), "arch": args.arch, "batch": args.batch, "world_size": int(os.environ["WORLD_SIZE"]),
           "zero2": z2, "zero3": z3, "time_ratio_z3_over_z2": round(z3["step_s"] / z2["step_s"], 3),
           "memory_ratio_z3_over_z2": round(z3["peak_gib"] / z2["peak_gib"], 3)}
    for k, v in res.items():
        print(f"{k}: {v}")
    return res


if __name__ == "__main__":
    main()
