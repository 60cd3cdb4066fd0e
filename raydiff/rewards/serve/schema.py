"""HTTP wire format of the reward service: request/response schemas and image decoding.

Nothing is pickled on the wire: images are PNG or raw uint8 (H, W, 3), base64 in JSON.
A bad item becomes a per-item error string (decode_item never raises); a malformed
request fails pydantic validation (422 in the ingress).
"""

import base64
import io
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

class ImageItem(BaseModel):
    """One image: PNG bytes, or raw uint8 bytes in row-major (H, W, 3) order; base64 in `data`."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["png", "raw"] = Field("png", description="png (lossless, any size) or raw (uint8 HWC bytes).")
    data: str = Field(..., description="base64 (standard alphabet) of the PNG file or the raw bytes.")
    shape: list[int] | None = Field(None, description="[H, W, 3]; required for raw, checked for png when given.")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(..., description="One prompt per image.")
    images: list[ImageItem] = Field(..., description="Images to score, same order as prompts.")
    groups: list[list[int]] | None = Field(
        None, description="Group-wise rewards: a partition of the image indices, e.g. [[0,1,2,3],[4,5,6,7]] (the k "
                          "samples of each prompt). Default: images with the same prompt form a group. Pointwise "
                          "rewards ignore it.")
    group_ids: list[int | str] | None = Field(
        None, description="Alternative to groups: one group id per image; images with equal ids form a group.")

    @model_validator(mode="after")
    def _same_length(self):
        from raydiff.rewards.base import check_groups

        if len(self.prompts) != len(self.images):
            raise ValueError(f"prompts has {len(self.prompts)} entries but images has {len(self.images)}; "
                             "send one prompt per image")
        if self.groups is not None and self.group_ids is not None:
            raise ValueError("send either groups or group_ids, not both")
        if self.group_ids is not None:
            if len(self.group_ids) != len(self.images):
                raise ValueError(f"group_ids has {len(self.group_ids)} entries but images has {len(self.images)}; "
                                 "send one group id per image")
            by: dict = {}
            for i, g in enumerate(self.group_ids):
                by.setdefault(g, []).append(i)
            self.groups, self.group_ids = list(by.values()), None
        if self.groups is not None:
            check_groups(self.groups, len(self.images))  # ValueError -> 422 naming the group
        return self


class MixRequest(ScoreRequest):
    rewards: dict[str, float] | None = Field(
        None, description="{reward name: weight}; finite weights; default: every served reward at its configured weight."
    )

    @model_validator(mode="after")
    def _finite(self):
        for k, w in (self.rewards or {}).items():
            if not math.isfinite(w):
                raise ValueError(f"rewards.{k}: weight must be a finite number, got {w}")
        if self.rewards is not None and not self.rewards:
            raise ValueError("rewards is empty; name at least one reward or omit the field")
        return self


class ScoreResponse(BaseModel):
    scores: list[float | None]
    errors: list[str | None]
    model: str
    version: str
    batch_size: int = Field(description="Images scored in the same model batch (after @serve.batch merging).")
    batched_requests: int = Field(description="Requests @serve.batch merged with this one.")
    latency_ms: float


class MixResponse(BaseModel):
    total: list[float | None]
    errors: list[str | None]
    weights: dict[str, float]
    components: dict[str, ScoreResponse]
    latency_ms: float


def decode_item(item: ImageItem, max_pixels: int) -> np.ndarray | str:
    """Decode one image to uint8 (H, W, 3); on any problem return the error message instead."""
    try:
        raw = base64.b64decode(item.data, validate=True)
    except Exception:
        return "data is not valid base64"
    if item.format == "raw":
        shp = item.shape
        if shp is None or len(shp) != 3 or shp[2] != 3 or min(shp) < 1:
            return f"raw images need shape [H, W, 3] with H, W >= 1, got {shp}"
        if shp[0] * shp[1] > max_pixels:
            return f"image has {shp[0] * shp[1]} pixels, more than max_image_pixels={max_pixels}"
        need = shp[0] * shp[1] * 3
        if len(raw) != need:
            return f"raw data has {len(raw)} bytes but shape {shp} needs {need} (uint8, one byte per value)"
        return np.frombuffer(raw, np.uint8).reshape(shp)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                return f"expected a PNG (lossless), got {im.format or 'unknown format'}"
            if im.width * im.height > max_pixels:
                return f"image has {im.width * im.height} pixels, more than max_image_pixels={max_pixels}"
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Image.UnidentifiedImageError:
        return "undecodable PNG: data is not an image file"
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many types
        return f"undecodable PNG: {type(e).__name__}: {e}"[:300]
    if item.shape is not None and list(arr.shape) != list(item.shape):
        return f"decoded PNG has shape {list(arr.shape)} but shape says {item.shape}"
    return arr

