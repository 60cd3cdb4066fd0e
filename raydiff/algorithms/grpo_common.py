r"""What the group-relative algorithms (Flow-GRPO, DiffusionNFT) share: advantages and the reference policy.

Group-relative advantage (Flow-GRPO eq. 4, DeepSeek-GRPO). The engine samples k images per
prompt (`Needs.samples_per_prompt`, engine/groups.py); for sample i of group g with reward r_i

    A_i = (r_i − mean_g r) / (std_g r + ε)         std over the group (population, ddof = 0)
    A_i = (r_i − mean_g r) / (std_all r + ε)       `global_std`: std over the whole epoch's batch

ε = `std_eps` (1e-4 as yifan123/flow_grpo and NVlabs/DiffusionNFT) guards groups whose images all
score the same: their advantages are exactly 0. Groups are the engine's group ids, not prompt
strings (the references group by prompt text; equal unless one prompt is drawn for two groups).

Reference policy π_ref = the base weights with the LoRA switched off (`reference_weights`): the
same network object, no second copy, as the references do with peft's `disable_adapter()`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def group_advantages(rewards, group_ids, std_eps: float = 1e-4, global_std: bool = False) -> np.ndarray:
    """(N,) float64 advantages: reward minus its group's mean, over the group's (or the batch's) std + ε."""
    r = np.asarray(rewards, np.float64)
    ids = np.asarray(group_ids)
    if r.shape != ids.shape or r.ndim != 1:
        raise ValueError(f"rewards {r.shape} and group ids {ids.shape} must be two (N,) arrays")
    out = np.empty_like(r)
    all_std = r.std()
    for g in np.unique(ids):
        m = ids == g
        std = all_std if global_std else r[m].std()
        out[m] = (r[m] - r[m].mean()) / (std + std_eps)
    return out


def require_groups(batch, k: int, name: str) -> np.ndarray:
    """The batch's group ids, checking every group arrived whole (k members, one prompt)."""
    if batch.group_ids is None:
        raise ValueError(f"algorithm {name!r} needs group ids on its batches (Needs.samples_per_prompt); the engine did not set them")
    ids = batch.group_ids.numpy()
    prompts = np.asarray(batch.prompts, dtype=object)
    for g in np.unique(ids):
        m = ids == g
        if m.sum() != k or len(set(prompts[m])) != 1:
            raise RuntimeError(f"group {int(g)} arrived with {int(m.sum())} of {k} samples and prompts {sorted(set(prompts[m]))[:3]}: "
                               "groups must stay whole (engine/groups.py)")
    return ids


@contextlib.contextmanager
def reference_weights(denoiser):
    """Inside, `denoiser` computes with its base weights only (every LoRA adapter off); restored on exit.

    diffusers models carrying peft adapters (`add_adapter`) expose disable_adapters/enable_adapters;
    a peft `PeftModel` exposes the `disable_adapter()` context. Fully fine-tuned networks have no
    adapter to switch off: the reference would need a frozen copy, which raydiff does not keep.
    """
    if hasattr(denoiser, "disable_adapter") and not hasattr(denoiser, "disable_adapters"):
        with denoiser.disable_adapter():
            yield
        return
    if not getattr(denoiser, "peft_config", None):
        raise ValueError("the KL to the reference policy switches the LoRA off to get the base weights; with "
                         "model.finetune=full there is none: use model.finetune=lora or set the KL weight to 0")
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


def step_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,) KL(π_θ‖π_ref) of one Gaussian step as Flow-GRPO: mean_CHW (μ_θ − μ_ref)² / (2 σ_t²).

    σ_t is the step's noise scale *before* the √(−dt) factor (`std_dev_t` in yifan123/flow_grpo),
    so this is the reference's KL up to that constant per step; computed in fp32.
    """
    d = (mean.float() - ref_mean.float()) ** 2
    s = std.float().reshape(-1, *([1] * (d.ndim - 1))) if std.ndim else std.float()
    return (d / (2 * s**2)).mean(dim=tuple(range(1, d.ndim)))
