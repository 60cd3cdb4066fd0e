"""Speed levers applied to a loaded model: channels_last memory format and torch.compile.

`model.channels_last` puts the UNet and VAE conv weights in NHWC (cuDNN's fast layout on
GPU); `model.compile` wraps the UNet forward with `torch.compile` in place (`Module.compile`),
so parameter names, peft adapters, state dicts and checksums are unchanged. Rollout workers and
learners both call `apply_speedups` after loading. A fused-LoRA version swap changes only
parameter values and peft's `merged` flag: at most one recompile per flag value.
"""

from __future__ import annotations

import torch


def apply_speedups(model, cfg) -> None:
    """Apply `cfg.channels_last` and `cfg.compile` (a ModelSection) to `model` in place."""
    if getattr(cfg, "channels_last", False):
        model.denoiser.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if getattr(cfg, "compile", False):
        model.denoiser.compile(dynamic=False)
