r"""AlignProp: reward backpropagation through the sampling chain (Prabhudesai et al., arXiv 2310.03739).

With x_0 = DDIM_θ(x_T, c) sampled with gradients (CFG, per-UNet-call checkpointing)
and a differentiable reward r (weighted sum of `reward.components`), the loss is

    L(θ) = −E_{c, x_T}[ r̃(x_0, c) ] + λ_ref · Σ_{trained t} ‖ε̂_θ(x_t) − ε̂_ref(x_t)‖²/d + λ_L2 · Σ_ℓ ‖ΔW_ℓ‖²

where r̃ = r (default), min(r, r_clip) (`reward_clip`) or −|r − r*| (`reward_target`),
ε̂_ref is the frozen base model (LoRA adapters disabled), d = N·C·h·w, ΔW_ℓ = s·B_ℓA_ℓ
the LoRA update of layer ℓ. Backprop is truncated to the last K steps with
K ~ U{k_min..k_max} drawn per update (AlignProp's randomised truncation; the earlier
chain runs under no_grad). Defaults 1..50 follow the reference code
(`truncated_backprop_minmax = (0, 50)`: steps i < cut are detached, cut ~ U{0..50},
so K = 50 − cut; K = 0 would leave no gradient, hence k_min = 1). LoRA only in the paper, lr ≈ 1e-3.

The shared machinery (`RewardBackprop`, `RewardBackpropConfig`) lives in reward_backprop.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydiff.algorithms.reward_backprop import RewardBackprop, RewardBackpropConfig, lora_delta_l2  # noqa: F401


class Config(RewardBackpropConfig):
    name: Literal["alignprop"] = Field("alignprop", description="Algorithm name.")
    k_min: int = Field(1, ge=1, description="Smallest K: backprop through the last K DDIM steps, K ~ U{k_min..k_max} per update, clipped to sampling.num_steps (reference code: cut ~ U{0..50} of 50 steps, K = 50 − cut; K = 0 has no gradient, so 1).")
    k_max: int = Field(50, ge=1, description="Largest K (reference code: 50 = the whole chain; k_min = k_max = sampling.num_steps is full backprop).")


class AlignProp(RewardBackprop):
    config_cls = Config


ALGORITHM = AlignProp
