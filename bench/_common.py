"""Shared helpers of the bench scripts: argument flags, machine description, result line."""

from __future__ import annotations

import argparse
import json
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def model_flags(p: argparse.ArgumentParser, steps: int = 6, batch: int = 4) -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny://sd", help="model path (tiny://sd on CPU; a diffusers folder on GPU)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--steps", type=int, default=steps, help="DDIM steps")
    p.add_argument("--batch", type=int, default=batch, help="images per batch")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    return p


def device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu}


def report(name: str, result: dict, as_json: bool) -> None:
    """Print `RATIO <name> <value>` (parsed by run_all.py) and the details."""
    for k, v in result.items():
        if k != "ratio":
            print(f"  {k}: {v}")
    print(f"RATIO {name} {result['ratio']:.3f}")
    if as_json:
        print("JSON " + json.dumps({"bench": name, **result}))


def spread(xs: list[float], unit: str = "") -> str:
    """median (min, max, n) of repeated measurements: how far one run can be trusted."""
    import statistics

    return f"median {statistics.median(xs):.3f}{unit} (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"
