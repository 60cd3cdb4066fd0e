"""Peak memory and step time of one differentiable-sampling update: checkpointing on/off × K = 1 / all.

    python bench/grad_memory.py [--model tiny://sd] [--steps 10] [--batch 4] [--resolution 256] [--repeats 2]

Each case runs in its own subprocess (peak memory is per process). On GPU the
figure is `torch.cuda.max_memory_allocated` during the update; on CPU it is the
growth of the process's peak RSS (`resource.getrusage().ru_maxrss`) over the
RSS after loading and one no-grad warm-up chain, so it counts the autograd
graph and activations the update keeps. Step time is the median of `--repeats`
updates (sample with gradients + decode + reward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def run_case(args) -> dict:
    import torch

    from raydiff.config import load_config
    from raydiff.models.loader import load_model
    from raydiff.rewards.simple import Brightness
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.differentiable import decode_with_grad, last_k, sample_with_grad

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [f"model.path={args.model}"] + ([f"model.resolution={args.resolution}"] if args.resolution else [])
    model = load_model(load_config(None, overrides).model, device)
    cond = encode_prompts(model, ["a photo of a cat"] * args.batch)
    k = args.steps if args.k == "all" else int(args.k)
    plan = last_k(args.steps, k)
    reward = Brightness()

    def update():
        gen = torch.Generator(device=model.device).manual_seed(0)
        out = sample_with_grad(model, cond, plan, 3.0, 0.0, gen, checkpointing=args.checkpointing)
        loss = -reward.score_tensor(decode_with_grad(model, out.latents, args.checkpointing), []).mean()
        loss.backward()
        for p in model.trainable_parameters():
            p.grad = None

    with torch.no_grad():  # warm-up: allocator pools, kernels, lazy inits
        sample_with_grad(model, cond, plan, 3.0, 0.0, torch.Generator(device=model.device).manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        update()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"k": args.k, "checkpointing": args.checkpointing, "peak_mib": peak_mib, "step_s": statistics.median(times), "device": device}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny://sd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256, help="image side; larger makes activations dominate")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--case", nargs=2, metavar=("K", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        args.k, args.checkpointing = args.case[0], args.case[1] == "1"
        print(json.dumps(run_case(args)))
        return
    results = {}
    for k in ("1", "all"):
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--resolution", str(args.resolution), "--repeats", str(args.repeats), "--case", k, "1" if ckpt else "0"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
            if out.returncode:
                sys.exit(f"case K={k} checkpointing={ckpt} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[(k, ckpt)] = res
            print(f"K={k:>3} checkpointing={str(ckpt):5}  peak +{res['peak_mib']:8.1f} MiB  step {res['step_s']:6.2f} s  ({res['device']})", flush=True)
    r = results
    print(f"\nsteps={args.steps} batch={args.batch} resolution={args.resolution} model={args.model}")
    for k in ("1", "all"):
        print(f"K={k}: memory no-ckpt/ckpt = {r[(k, False)]['peak_mib'] / max(r[(k, True)]['peak_mib'], 1e-6):.2f}x, "
              f"time ckpt/no-ckpt = {r[(k, True)]['step_s'] / r[(k, False)]['step_s']:.2f}x")
    for ck in (False, True):
        print(f"checkpointing={ck}: memory K=all/K=1 = {r[('all', ck)]['peak_mib'] / max(r[('1', ck)]['peak_mib'], 1e-6):.2f}x, "
              f"time K=all/K=1 = {r[('all', ck)]['step_s'] / r[('1', ck)]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
