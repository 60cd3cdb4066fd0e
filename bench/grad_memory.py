"""Peak memory and step time of one differentiable-sampling update: checkpointing on/off × K = 1 / all.

    python bench/grad_memory.py [--model tiny://sd] [--steps 10] [--batch 4] [--resolution 256] [--repeats 2]

Each case runs in its own subprocess (peak memory is per process). On GPU the
figure is `torch.cuda.max_memory_allocated` over one update minus the memory allocated
before it. On CPU: before each update, freed heap is returned to the OS (`malloc_trim`)
and the kernel's peak-RSS mark is reset to the current RSS (`/proc/self/clear_refs` 5);
the figure is the peak mark after the update minus the RSS before it, the largest over
`--repeats` updates (no lifetime maximum, no warm-up in it). Also printed, allocator-free:
the bytes the autograd graph saves for backward (`saved_tensors_hooks`, unique storages; without
checkpointing only: torch.utils.checkpoint installs its own hooks, so the count would read 0).
Step time is the median of `--repeats` updates (sample with gradients + decode + reward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
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

    torch.set_num_threads(args.threads)
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

    with torch.no_grad():  # warm-up: kernels, lazy inits
        sample_with_grad(model, cond, plan, 3.0, 0.0, torch.Generator(device=model.device).manual_seed(0))
    saved = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        update()  # counts what backward needs; also a warm-up of the update
    times, peaks = [], []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _reset_peak_rss()
        t0 = time.perf_counter()
        update()
        if device == "cuda":
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            peaks.append((_status_kib("VmHWM") - base) / 1024)
        times.append(time.perf_counter() - t0)
    return {"k": args.k, "checkpointing": args.checkpointing, "peak_mib": max(peaks),
            "saved_for_backward_mib": None if args.checkpointing else saved.total / 2**20,
            "step_s": statistics.median(times), "device": device}


class _SavedBytes:
    """Sum of unique storages the autograd graph saves (a weight saved by many ops counts once; parameters excluded)."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        import torch

        if isinstance(t, torch.nn.Parameter):
            return t  # weights (frozen or LoRA): not activation memory
        key = t.untyped_storage().data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def unpack(self, t):
        return t


def _reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the kernel's peak-RSS mark to the current RSS; that RSS (KiB)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny://sd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256, help="image side; larger makes activations dominate")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores stalls OpenMP on a loaded machine)")
    ap.add_argument("--case", nargs=2, metavar=("K", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        args.k, args.checkpointing = args.case[0], args.case[1] == "1"
        print(json.dumps(run_case(args)))
        return
    results = {}
    for k in ("1", "all"):
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--resolution", str(args.resolution), "--repeats", str(args.repeats), "--threads", str(args.threads), "--case", k, "1" if ckpt else "0"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
            if out.returncode:
                sys.exit(f"case K={k} checkpointing={ckpt} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[(k, ckpt)] = res
            sv = res["saved_for_backward_mib"]
            print(f"K={k:>3} checkpointing={str(ckpt):5}  peak +{res['peak_mib']:8.1f} MiB  saved for backward "
                  f"{'     n/a' if sv is None else f'{sv:8.1f}'} MiB  step {res['step_s']:6.2f} s  ({res['device']})", flush=True)
    r = results
    print(f"\nsteps={args.steps} batch={args.batch} resolution={args.resolution} model={args.model}")
    for k in ("1", "all"):
        print(f"K={k}: memory no-ckpt/ckpt = {r[(k, False)]['peak_mib'] / max(r[(k, True)]['peak_mib'], 1e-6):.2f}x, "
              f"time ckpt/no-ckpt = {r[(k, True)]['step_s'] / r[(k, False)]['step_s']:.2f}x")
    for ck in (False, True):
        print(f"checkpointing={ck}: memory K=all/K=1 = {r[('all', ck)]['peak_mib'] / max(r[('1', ck)]['peak_mib'], 1e-6):.2f}x, "
              f"time K=all/K=1 = {r[('all', ck)]['step_s'] / r[('1', ck)]['step_s']:.2f}x")
    print(f"RATIO grad_memory_K_all_no_ckpt_over_ckpt {r[('all', False)]['peak_mib'] / max(r[('all', True)]['peak_mib'], 1e-6):.3f}")


if __name__ == "__main__":
    main()
