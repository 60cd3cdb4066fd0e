"""Reward replicas: one `RewardWorker` per replica of one served reward, batched by `@serve.batch`.

Invariant: no exception from a reward escapes `RewardWorker` (the replica stays up); a bad
item gets a per-item error and a failing chunk is retried one image at a time to isolate it.
Group-wise rewards score each request's groups whole (never split across model chunks or merged
with another request's images); a failing request is retried group by group.
"""

import asyncio
import math
from typing import Any

import numpy as np
from ray import serve

from raydiff.rewards.service_config import RewardComponent


class RewardWorker:
    """One replica of one reward. `score` takes numpy images (N,H,W,3) uint8 (or a list of (H,W,3)) + prompts.

    Returns {"scores": float32 (N,) with NaN where errors[i] is set, "errors": [str|None]*N,
    "batch_size": images scored together with this request, "batched_requests": requests merged,
    "version": reward version}.
    """

    def __init__(self, cfg: dict, max_image_pixels: int = 4096 * 4096):
        from raydiff.rewards.base import make_reward

        self.cfg = RewardComponent.model_validate(cfg)
        self.config_hash = self.cfg.deployment_hash()
        self.reward = make_reward(self.cfg.registry_name, **self.cfg.args)
        self.max_image_pixels = max_image_pixels
        self.score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        """Serve hands over the deployment's user_config: {config_hash, config} written by build_app (reuse.py reads it)."""
        self.config_hash = (user_config or {}).get("config_hash", self.config_hash)

    def info(self) -> dict:
        i = self.reward.info()
        return {"name": self.cfg.name, "reward": i.name, "version": i.version, "differentiable": i.differentiable,
                "input_size": i.input_size, "range": list(i.range) if i.range else None, "weight": self.cfg.weight,
                "group_wise": i.group_wise, "config_hash": self.config_hash}

    async def score(self, images, prompts: list[str], groups: list[list[int]] | None = None) -> dict:
        """`groups` (a partition of the image indices) matters only to group-wise rewards; default: by prompt."""
        return await self.score_batch((images, list(prompts), groups))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # real values set in __init__ from the config
    async def score_batch(self, requests: list[tuple[Any, list[str], Any]]) -> list[dict]:
        return await asyncio.to_thread(self._score_requests, requests)

    def _score_requests(self, requests: list[tuple[Any, list[str], Any]]) -> list[dict]:
        # Flatten every request's items, validate each, group equal shapes, score groups in chunks.
        items: list[tuple[int, int, np.ndarray | None, str]] = []  # (request, index, image, prompt)
        results = []
        for r, (images, prompts, _) in enumerate(requests):
            n = len(images)
            results.append({"scores": np.full(n, np.nan, np.float32), "errors": [None] * n})
            if len(prompts) != n:
                results[r]["errors"] = [f"got {n} images but {len(prompts)} prompts"] * n
                continue
            for i in range(n):
                img, err = _check_item(images[i], self.max_image_pixels)
                if err:
                    results[r]["errors"][i] = err
                else:
                    items.append((r, i, img, str(prompts[i])))
        if self.reward.group_wise:
            for r, (_, prompts, groups) in enumerate(requests):
                self._score_groups([it for it in items if it[0] == r], groups, results)
        else:
            by_shape: dict[tuple, list] = {}
            for it in items:
                by_shape.setdefault(it[2].shape, []).append(it)
            chunk = self.cfg.max_images_per_forward
            for same in by_shape.values():
                for k in range(0, len(same), chunk):
                    self._score_chunk(same[k : k + chunk], results)
        for res in results:
            res.update(batch_size=len(items), batched_requests=len(requests), version=self.reward.version)
        return results

    def _score_groups(self, items: list, groups: list[list[int]] | None, results: list[dict]) -> None:
        """One request of a group-wise reward: its valid items with `groups` re-indexed onto them."""
        from raydiff.rewards.base import groups_by_prompt

        if not items:
            return
        pos = {it[1]: j for j, it in enumerate(items)}
        groups = groups_by_prompt([it[3] for it in items]) if groups is None else \
            [g for g in ([pos[i] for i in grp if i in pos] for grp in groups) if g]
        scores, failed = np.full(len(items), np.nan, np.float32), {}
        # All groups in one call; if that fails, one call per group isolates the failing group(s).
        # (A group's images must share one shape: np.stack fails otherwise, as an error of that group.)
        for n, part in enumerate([groups] if len(groups) == 1 else [groups, *([g] for g in groups)]):
            members = [j for g in part for j in g]
            local = {j: k for k, j in enumerate(members)}
            try:
                scores[members] = self.reward(np.stack([items[j][2] for j in members]),
                                              [items[j][3] for j in members], [[local[j] for j in g] for g in part])
                if n == 0:
                    break
            except Exception as e:  # noqa: BLE001
                if len(part) == 1:
                    failed.update({j: f"reward failed: {type(e).__name__}: {e}"[:500] for j in members})
        for j, (r, i, _, _) in enumerate(items):
            if j in failed:
                results[r]["errors"][i] = failed[j]
            elif not math.isfinite(float(scores[j])):
                results[r]["errors"][i] = "reward returned a non-finite score"
            else:
                results[r]["scores"][i] = scores[j]

    def _score_chunk(self, chunk: list, results: list[dict]) -> None:
        try:
            scores = self.reward(np.stack([it[2] for it in chunk]), [it[3] for it in chunk])
        except Exception as e:  # noqa: BLE001 - isolate the bad item(s): retry one by one
            if len(chunk) > 1:
                for it in chunk:
                    self._score_chunk([it], results)
                return
            scores, err = None, f"reward failed: {type(e).__name__}: {e}"[:500]
        for j, (r, i, _, _) in enumerate(chunk):
            if scores is None:
                results[r]["errors"][i] = err
            elif not math.isfinite(float(scores[j])):
                results[r]["errors"][i] = "reward returned a non-finite score"
            else:
                results[r]["scores"][i] = scores[j]


def _check_item(img, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    if isinstance(img, str):  # decoding error carried from the ingress
        return None, img
    a = np.asarray(img)
    if a.dtype != np.uint8:
        return None, f"image must be uint8, got {a.dtype}"
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        return None, f"image must have shape [H, W, 3], got {list(a.shape)}"
    if a.shape[0] * a.shape[1] > max_pixels:
        return None, f"image has {a.shape[0] * a.shape[1]} pixels, more than max_image_pixels={max_pixels}"
    return a, None

