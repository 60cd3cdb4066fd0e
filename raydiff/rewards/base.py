"""The one reward contract every scorer follows, in-process, served or differentiable.

    reward(images: uint8 ndarray (N, H, W, 3), prompts: list[str]) -> float32 ndarray (N,)

Differentiable rewards also implement `score_tensor(images: float tensor
(N, 3, H, W) in [0, 1], prompts) -> tensor (N,)` that keeps the graph, so
synchronous learners can backpropagate through them. Rewards register by name;
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


def _load_builtin() -> None:
    # Importing the modules runs their @register_reward decorators.
    from raydiff.rewards import clip_rewards, geneval, ocr, simple  # noqa: F401


@dataclass(frozen=True)
class RewardInfo:
    """What the service catalogue and the trainer need to know about a reward."""

    name: str
    version: str
    differentiable: bool
    input_size: int | None  # side the model resizes to; None = any size
    range: tuple[float, float] | None  # typical score range, None = unbounded


class Reward:
    """Base class: subclasses implement `score_tensor` (differentiable) or `score_uint8`."""

    name: ClassVar[str] = "reward"
    version: ClassVar[str] = "1"
    differentiable: ClassVar[bool] = False
    input_size: ClassVar[int | None] = None
    range: ClassVar[tuple[float, float] | None] = None

    def info(self) -> RewardInfo:
        return RewardInfo(self.name, self.version, self.differentiable, self.input_size, self.range)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images = check_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        if len(images) == 0:
            return np.zeros((0,), np.float32)
        return np.asarray(self.score_uint8(images, list(prompts)), dtype=np.float32).reshape(len(images))

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


class WeightedRewards:
    """A weighted sum of rewards; returns the total and each component (for logging)."""

    def __init__(self, components: list[tuple[Reward, float]]):
        if not components:
            raise ValueError("reward.components is empty; add at least one reward, e.g. {name: brightness}")
        self.components = components

    def __call__(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = {r.name: r(images, prompts) for r, _ in self.components}
        total = sum(w * parts[r.name] for r, w in self.components)
        return np.asarray(total, np.float32), parts
