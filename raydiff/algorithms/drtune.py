r"""DRTune: deep reward supervision with stop-gradient inputs (Wu et al., arXiv 2405.00760).

Sample DDIM with the UNet's *input* detached, ε̂_t = ε̂_θ(sg(x_t), t, c), so every
step x_{t−1} = a_t·x_t + b_t·ε̂_t passes gradient back through the scalar a_t only
(no product of UNet Jacobians, hence no explosion) and into θ through ε̂ of the
trained steps. Trained steps S (|S| = K) are spread over the chain with a random
phase, stride s = ⌊(m+1)/K⌋, S = {o + s·j}, o ~ U{0..s−1} (so early steps train too);
the other UNet calls run under no_grad. Sampling stops early at a random step
m ~ U{m_lo..T−1} (m_lo = ⌈stop_min_fraction·T⌉ − 1) and the prediction there is supervised:

    x̂_0^{(m)} = (x_{t_m} − √(1−ᾱ_{t_m}) ε̂_{t_m}) / √ᾱ_{t_m}
    L(θ) = −r̃(x̂_0^{(m)}, c) + reg        (r̃ and reg as in `alignprop.py`)

Their SDXL run optimised HPSv2.1 (`configs/drtune_sdxl.yaml`).
"""

from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import Field

from raydiff.algorithms.reward_backprop import RewardBackprop, RewardBackpropConfig
from raydiff.sampling.differentiable import GradPlan, spread_steps


class Config(RewardBackpropConfig):
    name: Literal["drtune"] = Field("drtune", description="Algorithm name.")
    k: int = Field(5, ge=1, description="Trained steps K spread over the chain that runs (DRTune: 5 of 50); clipped to the steps run.")
    stop_grad_input: bool = Field(True, description="Detach the UNet input x_t (DRTune's key change); false gives AlignProp-style full backprop through the trained steps.")
    early_stop: bool = Field(True, description="Stop sampling at a random step m and supervise x̂_0 predicted there; false runs the full chain to x_0.")
    stop_min_fraction: float = Field(0.5, gt=0, le=1, description="Earliest early stop as a fraction of the chain: m+1 ~ U{⌈f·T⌉..T} steps run.")


class DRTune(RewardBackprop):
    config_cls = Config

    def plan(self, num_steps: int, rng: random.Random) -> GradPlan:
        c = self.config
        stop_at = None
        run = num_steps
        if c.early_stop:
            lo = max(1, math.ceil(c.stop_min_fraction * num_steps))
            run = rng.randint(lo, num_steps)
            stop_at = run - 1
        steps = spread_steps(run, c.k, rng)
        return GradPlan(num_steps, steps, truncate=False, stop_grad_input=c.stop_grad_input, stop_at=stop_at)


ALGORITHM = DRTune
