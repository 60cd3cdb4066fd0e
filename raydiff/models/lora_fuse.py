"""Fused-LoRA rollout weights: merge the adapters into the base weights once per weight version.

Rollouts never train, so the live LoRA path (an extra A·x and B·(A·x) per adapted linear, with
dtype casts) is pure overhead there. `RolloutWeights.load(state)` restores the pristine base
weights, loads the new adapter weights and merges them with peft's own `merge` (W' = W + s·B·A);
forward calls then only run the base layers. Reversal is exact: the base weights of the adapted
layers are kept once (frozen, so the copy stays valid) and copied back, never re-derived by
subtracting the delta (W + d − d ≠ W in floating point). `checksum_base()` proves it.

In bf16 the merged weight is rounded once per element, the live path rounds its output; both
are within bf16 tolerance of each other, not bit-equal.
"""

from __future__ import annotations

import hashlib

import torch

from raydiff.models.lora import load_trainable_state_dict


def lora_layers(unet) -> list:
    """The peft LoRA layers of `unet` (empty for a fully trainable UNet)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no adapters to fuse
        return []
    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


class RolloutWeights:
    """Loads new trainable weights into a rollout UNet; with `fuse`, keeps LoRA merged into the base weights."""

    def __init__(self, unet, fuse: bool):
        self.unet = unet
        self.layers = lora_layers(unet) if fuse else []
        self.fused = False
        self._pristine: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if self.layers:
            self._pristine = [(m.get_base_layer().weight.detach().clone(),
                               None if m.get_base_layer().bias is None else m.get_base_layer().bias.detach().clone())
                              for m in self.layers]
            self.fuse()

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def fuse(self) -> None:
        """W ← W + s·B·A for every adapter (peft's merge); the live LoRA branch is then skipped."""
        if not self.layers or self.fused:
            return
        with torch.no_grad():
            for m in self.layers:
                m.merge(safe_merge=False)
        self.fused = True

    def unfuse(self) -> None:
        """Copy the pristine base weights back (bit-exact) and re-enable the live LoRA branch."""
        if not self.fused:
            return
        with torch.no_grad():
            for m, (w, b) in zip(self.layers, self._pristine):
                base = m.get_base_layer()
                base.weight.copy_(w)
                if b is not None:
                    base.bias.copy_(b)
                m.merged_adapters.clear()
        self.fused = False

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Apply a new weight version: unfuse, copy `state` into the trainable parameters, fuse again."""
        self.unfuse()
        load_trainable_state_dict(self.unet, state)
        self.fuse()

    def checksum_base(self) -> str:
        """SHA-256 of the adapted layers' current base weights (equals the pristine one when unfused)."""
        h = hashlib.sha256()
        for m in self.layers:
            base = m.get_base_layer()
            for t in (base.weight, base.bias):
                if t is not None:
                    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
