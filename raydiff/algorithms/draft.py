r"""DRaFT-K and DRaFT-LV: direct reward fine-tuning (Clark et al., arXiv 2309.17400).

x_0 = DDIM_θ(x_T, c) (η = 0 by default), differentiable reward r, loss as AlignProp's
(`alignprop.py`: −r̃ plus the optional reference / LoRA-L2 regularisers):

DRaFT-K (`variant: k`): gradients only through the last K steps (fixed K; the chain
before runs under no_grad, x detached there):

    ∇θ L = −∇θ r̃(x_0, c),   x_0 depends on θ only through steps T−K+1..T of the chain

DRaFT-LV (`variant: lv`, Clark et al. Algorithm 2): the whole chain runs without
gradients; n re-noised copies of its x_0 are denoised by one differentiated step.
With t_1 the last step's timestep and ε'_i ~ N(0, I):

    x'_i = √ᾱ_{t_1} · sg(x_0) + √(1 − ᾱ_{t_1}) · ε'_i,   x̃_0^i = DDIM-step_θ(x'_i, t_1)
    L = −(1/n) · Σ_{i=1..n} r̃(x̃_0^i, c) + reg

(the paper's default n = 2; the chain's own x_0 is only reported as reward/mean).
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from raydiff.algorithms.reward_backprop import RewardBackprop, RewardBackpropConfig
from raydiff.sampling.differentiable import GradPlan, last_k


class Config(RewardBackpropConfig):
    name: Literal["draft"] = Field("draft", description="Algorithm name.")
    variant: Literal["k", "lv"] = Field("k", description="k: backprop through the last `k` steps; lv: the chain without gradients plus `lv_renoise` re-noised one-step estimates.")
    k: int = Field(1, ge=1, description="DRaFT-K: steps at the end of the chain with gradients (paper: 1 works best; clipped to sampling.num_steps). Ignored by lv.")
    lv_renoise: int = Field(2, ge=1, description="DRaFT-LV: extra re-noisings n of x_0 to the last step's noise level (one differentiated UNet call + one VAE decode each).")


class DRaFT(RewardBackprop):
    config_cls = Config

    def plan(self, num_steps: int, rng: random.Random) -> GradPlan:
        c = self.config
        if c.variant == "lv":
            return last_k(num_steps, 0, lv_renoise=c.lv_renoise)  # no gradient through the chain itself
        return last_k(num_steps, c.k)


ALGORITHM = DRaFT
