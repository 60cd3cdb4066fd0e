"""`win_rate`: a group-wise reward from any pointwise one — each image's win rate within its group.

    r_i = ( #{j in g, j != i : s_j < s_i} + ½ #{j in g, j != i : s_j = s_i} ) / (k − 1),   k = |g| ≥ 2
    r_i = ½ for a group of one

This is the normalised average rank, so it is invariant to any monotone transform of the base
score (scale, offset, saturation): group-based algorithms get a bounded, outlier-free signal.
The pairwise `vlm_judge` produces the same quantity from head-to-head comparisons instead.
"""

from __future__ import annotations

from raydiff.rewards.base import Reward, make_reward, register_reward, win_rates


@register_reward("win_rate")
class WinRate(Reward):
    """Win rate within the group of the base reward's scores; args: reward (name), args (its arguments)."""

    group_wise = True
    range = (0.0, 1.0)

    def __init__(self, reward: str, args: dict | None = None):
        self.base = make_reward(reward, **(args or {}))
        if self.base.group_wise:
            raise ValueError(f"win_rate.reward {reward!r} is already group-wise; wrap a pointwise reward")
        self.version = f"win_rate({reward}:{self.base.version})"

    def score_groups(self, images, prompts, groups):
        return win_rates(self.base(images, prompts), groups)
