"""Rewards that need no weights: JPEG (in)compressibility (DDPO's tasks) and learnable toy targets for tests."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from raydiff.rewards.base import Reward, register_reward


def jpeg_kilobytes(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Size of each image saved as JPEG at `quality`, in kB (ddpo-pytorch's measure)."""
    sizes = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes, np.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Negative JPEG size in kB: smaller files score higher."""

    version = "1"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score_uint8(self, images, prompts):
        return -jpeg_kilobytes(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """JPEG size in kB: more detailed images score higher."""

    version = "1"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score_uint8(self, images, prompts):
        return jpeg_kilobytes(images, self.quality)


@register_reward("brightness")
class Brightness(Reward):
    """Mean pixel value in [0, 1]: a smooth, learnable reward for tests and smoke runs."""

    version = "1"
    differentiable = True
    range = (0.0, 1.0)

    def score_tensor(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@register_reward("color_target")
class ColorTarget(Reward):
    """Negative mean squared distance of each pixel to an RGB target in [0, 1]: learnable, bounded above by 0."""

    version = "1"
    differentiable = True
    range = (-3.0, 0.0)

    def __init__(self, rgb: tuple[float, float, float] = (1.0, 0.0, 0.0)):
        if len(rgb) != 3:
            raise ValueError(f"color_target.rgb needs 3 values in [0, 1], got {rgb}")
        self.rgb = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)

    def score_tensor(self, images, prompts):
        return -((images - self.rgb.to(images)) ** 2).sum(dim=1).mean(dim=(1, 2))
