"""The one reward contract every scorer follows, in-process, served or differentiable.

    reward(images: uint8 ndarray (N, H, W, 3), prompts: list[str]) -> float32 ndarray (N,)

Differentiable rewards also implement `score_tensor(images: float tensor
(N, 3, H, W) in [0, 1], prompts) -> tensor (N,)` that keeps the graph, so
synchronous learners can backpropagate through them.

Group-wise rewards (`group_wise = True`) score each image relative to the other samples of
its prompt (rank, win rate): `reward(images, prompts, groups)` with `groups` a partition of
range(N) into lists of indices; when no groups are given, images with the same prompt form
one group (how group-based algorithms such as Flow-GRPO sample k images per prompt).
Pointwise rewards accept and ignore `groups`. Rewards register by name;
configs and the reward service construct them with `make_reward(name, **args)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

_REGISTRY: dict[str, Callable[..., "Reward"]] = {}


def register_reward(name: str):
    """Class decorator: make the reward constructible by `name` from configs and the service."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def reward_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_reward(name: str, **args) -> "Reward":
    """Construct a registered reward; unknown names fail listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**args)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: bad arguments {sorted(args)}: {e}") from None


def reward_class(name: str):
    """The registered class of reward `name` (None if unknown): lets callers read class facts such as `group_wise`."""
    _load_builtin()
    return _REGISTRY.get(name)


def _load_builtin() -> None:
    # Importing the modules runs their @register_reward decorators.
    from raydiff.rewards import clip_rewards, geneval, group, imagereward, ocr, simple, vlm_judge  # noqa: F401


@dataclass(frozen=True)
class RewardInfo:
    """What the service catalogue and the trainer need to know about a reward."""

    name: str
    version: str
    differentiable: bool
    input_size: int | None  # side the model resizes to; None = any size
    range: tuple[float, float] | None  # typical score range, None = unbounded
    group_wise: bool = False  # scores depend on the other images of the group


class Reward:
    """Base class: subclasses implement `score_tensor` (differentiable) or `score_uint8`."""

    name: ClassVar[str] = "reward"
    version: ClassVar[str] = "1"
    differentiable: ClassVar[bool] = False
    input_size: ClassVar[int | None] = None
    range: ClassVar[tuple[float, float] | None] = None
    group_wise: ClassVar[bool] = False

    def info(self) -> RewardInfo:
        return RewardInfo(self.name, self.version, self.differentiable, self.input_size, self.range, self.group_wise)

    def __call__(self, images: np.ndarray, prompts: list[str], groups: list[list[int]] | None = None) -> np.ndarray:
        images = check_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        if groups is not None:
            groups = check_groups(groups, len(images))
        if len(images) == 0:
            return np.zeros((0,), np.float32)
        if self.group_wise:
            groups = groups if groups is not None else groups_by_prompt(prompts)
            out = self.score_groups(images, list(prompts), groups)
        else:
            out = self.score_uint8(images, list(prompts))
        return np.asarray(out, dtype=np.float32).reshape(len(images))

    def score_groups(self, images: np.ndarray, prompts: list[str], groups: list[list[int]]) -> np.ndarray:
        raise NotImplementedError(f"reward {self.name!r} is not group-wise")

    def score_uint8(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Default: run the differentiable path without gradients."""
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
            return self.score_tensor(x, prompts).float().cpu().numpy()

    def score_tensor(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"reward {self.name!r} is not differentiable")


def check_images(images) -> np.ndarray:
    """Validate an image batch: uint8, shape (N, H, W, 3)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {tuple(images.shape)}")
    return images


def check_groups(groups, n: int) -> list[list[int]]:
    """Validate that `groups` partitions range(n): every index in exactly one non-empty group."""
    seen: set[int] = set()
    out = []
    for g, members in enumerate(groups):
        members = [int(i) for i in members]
        if not members:
            raise ValueError(f"groups.{g} is empty; every group needs at least one image index")
        for i in members:
            if not 0 <= i < n:
                raise ValueError(f"groups.{g}: index {i} is out of range for {n} images")
            if i in seen:
                raise ValueError(f"groups.{g}: image {i} is in more than one group")
            seen.add(i)
        out.append(members)
    if len(seen) != n:
        missing = sorted(set(range(n)) - seen)[:10]
        raise ValueError(f"groups cover {len(seen)} of {n} images (missing {missing}); put every image in one group")
    return out


def groups_by_prompt(prompts: list[str]) -> list[list[int]]:
    """Images that share a prompt form one group, in order of first appearance."""
    by: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by.setdefault(p, []).append(i)
    return list(by.values())


def win_rates(scores, groups: list[list[int]]) -> np.ndarray:
    """Per image, the fraction of the other group members it beats (ties count 1/2); 0.5 alone.

    Equal to the normalised average rank (rank − 1) / (k − 1) with ties averaged.
    """
    s = np.asarray(scores, np.float64)
    out = np.full(len(s), 0.5)
    for g in groups:
        if len(g) < 2:
            continue
        v = s[g]
        wins = (v[:, None] > v[None, :]).sum(1) + 0.5 * ((v[:, None] == v[None, :]).sum(1) - 1)
        out[g] = wins / (len(g) - 1)
    return out


class WeightedRewards:
    """A weighted sum of rewards; returns the total and each component (for logging)."""

    def __init__(self, components: list[tuple[Reward, float]]):
        if not components:
            raise ValueError("reward.components is empty; add at least one reward, e.g. {name: brightness}")
        self.components = components

    def __call__(self, images: np.ndarray, prompts: list[str], groups: list[list[int]] | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = {r.name: r(images, prompts, groups) for r, _ in self.components}
        total = sum(w * parts[r.name] for r, w in self.components)
        return np.asarray(total, np.float32), parts
