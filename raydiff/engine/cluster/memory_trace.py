"""Measure a forward (and backward) pass's peak activation memory on the meta device.

Meta tensors have shapes and dtypes but no storage, so the real diffusers / transformers
modules run in milliseconds per layer with no weights and no GPU. `PeakTracker` watches
every ATen op (a TorchDispatchMode): each fresh output tensor adds its bytes to a live
counter and a finalizer subtracts them when the tensor is freed, so the counter follows
what an eager PyTorch run keeps alive, including what autograd saves for backward and what
gradient checkpointing frees. Views and in-place results share storage and are not counted.

Attention: on meta, `F.scaled_dot_product_attention` falls back to the math path, which
materialises the (L x L) score matrix. Real GPU runs use the fused flash / memory-efficient
kernels, which keep only q, k, v, the output and a per-row log-sum-exp; `fused_attention()`
swaps in an op with exactly that footprint, so the trace matches the GPU kernels.

    with fused_attention(), PeakTracker() as tracker:
        unet(x, t, encoder_hidden_states=e)
    tracker.peak  # bytes
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTracker(TorchDispatchMode):
    """Live and peak bytes of tensors created inside the mode (inputs made before it are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            aliases = i < len(returns) and returns[i].alias_info is not None  # views and in-place results
            if isinstance(t, torch.Tensor) and not aliases and id(t) not in inputs:
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                weakref.finalize(t, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class _FusedAttention(torch.autograd.Function):
    """Footprint of a flash / memory-efficient SDPA kernel: saves q, k, v; output like q with v's last dim."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return q.new_empty(q.shape[:-1] + v.shape[-1:])

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _sdpa(query, key, value, *args, **kwargs):
    if query.device.type == "meta":
        return _FusedAttention.apply(query, key, value)
    return _ORIGINAL_SDPA(query, key, value, *args, **kwargs)


@contextlib.contextmanager
def fused_attention():
    """Within this block, SDPA calls on meta tensors have the memory footprint of the fused GPU kernels.

    Patched at module level (diffusers and transformers look `F.scaled_dot_product_attention` up at
    call time) rather than with a TorchFunctionMode, because checkpoint recomputation in backward runs
    outside function modes. Tensors on real devices still get the real kernel.
    """
    F.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA


def traced_peak(fn, backward: bool = False) -> int:
    """Peak bytes of `fn()` (and of backward from its output when `backward`), fused attention."""
    with fused_attention(), PeakTracker() as tracker:
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        del out
    return tracker.peak
