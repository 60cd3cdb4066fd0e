"""`vlm_judge`: scores from a VLM behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang).

One POST {base_url}/chat/completions per image (mode point) or per image pair (mode pairwise),
images as PNG data URLs in `image_url` parts, temperature 0. Templates follow UnifiedReward
(CodeGoat24/UnifiedReward; the point prompt is the one Flow-GRPO's `unifiedreward_score_sglang` sends):
    point      "... assign a score from 1 to 5 after 'Final Score:' ..."   -> score / max_score in [0, 1]
    pairwise   "... output 'Image 1 is better' or 'Image 2 is better'"      -> win rate in the group
Pairwise is group-wise: every pair (i, j) of a group is judged (both orders with `both_orders`,
which cancels the judge's position bias), and image i scores its win rate.

Transport: at most `max_concurrency` requests in flight per reward instance, `timeout_s` per
request, `max_retries` retries with exponential backoff (×2, jittered, Retry-After honoured) on
timeouts, connection errors, 429 and 5xx; other 4xx fail at once. An answer the pattern does not
match is an error naming the answer and the pattern (never a silent 0, unlike Flow-GRPO).
`required: false` turns a failed item into `fallback_score` (point) or a tie (pairwise) instead of an error.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from raydiff.rewards.base import Reward, register_reward

log = logging.getLogger("raydiff.rewards.vlm_judge")

POINT_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the "
    "provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as described "
    "in the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from "
    "1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
PAIR_TEMPLATE = (
    "Given a caption and two images generated based on this caption, please analyze in detail the two provided "
    "images. Evaluate them on various dimensions such as semantic consistency (how closely the image content "
    "aligns with the caption), aesthetics (composition, color usage, artistic expression), authenticity (realism "
    "and attention to detail), and any other factors you deem relevant. Then output exactly one of the following "
    "strings: 'Image 1 is better' or 'Image 2 is better'.\nText Caption: [{prompt}]"
)
POINT_PATTERN = r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"
PAIR_PATTERN = r"Image\s*([12])\s*is\s*better"


class VlmJudgeError(RuntimeError):
    """The endpoint failed (after retries) or answered something the pattern cannot parse."""


def data_url(image: np.ndarray, size: int | None = None) -> str:
    """uint8 (H, W, 3) -> "data:image/png;base64,...", optionally resized to size × size first."""
    from PIL import Image

    im = Image.fromarray(image)
    if size:
        im = im.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_point(answer: str, pattern: str = POINT_PATTERN, max_score: float = 5.0) -> float:
    """The judge's score over max_score; VlmJudgeError when absent or out of [0, max_score]."""
    m = re.search(pattern, answer)
    if not m:
        raise VlmJudgeError(f"vlm_judge: unparsable answer {answer[:200]!r}: no match for {pattern!r} "
                            "(check the template asks for that format, or set vlm_judge.score_pattern)")
    value = float(m.group(1))
    if not 0 <= value <= max_score:
        raise VlmJudgeError(f"vlm_judge: score {value} in answer {answer[:120]!r} is outside [0, {max_score}]")
    return value / max_score


def parse_pair(answer: str, pattern: str = PAIR_PATTERN) -> int:
    """0 if the first image won, 1 if the second; VlmJudgeError otherwise."""
    m = re.search(pattern, answer)
    if not m:
        raise VlmJudgeError(f"vlm_judge: unparsable answer {answer[:200]!r}: no match for {pattern!r} "
                            "(expected 'Image 1 is better' or 'Image 2 is better')")
    return int(m.group(1)) - 1


@register_reward("vlm_judge")
class VlmJudge(Reward):
    """A VLM judge over HTTP; see the module docstring for modes, transport and failure handling."""

    range = (0.0, 1.0)

    def __init__(self, base_url: str, model: str = "UnifiedReward-qwen-7b", mode: str = "point",
                 template: str | None = None, score_pattern: str | None = None, max_score: float = 5.0,
                 both_orders: bool = True, image_size: int | None = None, max_tokens: int = 512,
                 max_concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5,
                 required: bool = True, fallback_score: float = 0.0, api_key_env: str | None = None):
        import httpx

        if mode not in ("point", "pairwise"):
            raise ValueError(f"vlm_judge.mode {mode!r} must be point or pairwise")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"vlm_judge.base_url {base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("vlm_judge: max_concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")
        self.mode, self.model, self.max_score, self.both_orders = mode, model, max_score, both_orders
        self.group_wise = mode == "pairwise"
        self.template = template or (PAIR_TEMPLATE if self.group_wise else POINT_TEMPLATE)
        self.pattern = score_pattern or (PAIR_PATTERN if self.group_wise else POINT_PATTERN)
        self.image_size, self.max_tokens = image_size, max_tokens
        self.max_concurrency, self.max_retries, self.backoff_s = max_concurrency, max_retries, backoff_s
        self.required, self.fallback_score = required, float(fallback_score)
        self.version = f"vlm-judge-{mode}:{model}"
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"vlm_judge.api_key_env names {api_key_env!r}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=max_concurrency))
        self._slots = threading.BoundedSemaphore(max_concurrency)  # shared by concurrent calls on this instance
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "fallbacks": 0}

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    # -- one request --------------------------------------------------------------------------

    def _post(self, images: list[np.ndarray], text: str) -> str:
        """The assistant's answer text; retries transient failures with backoff."""
        import httpx

        content = [{"type": "image_url", "image_url": {"url": data_url(im, self.image_size)}} for im in images]
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}]}
        for attempt in range(self.max_retries + 1):
            wait, why = None, None
            with self._slots:
                self._count("requests")
                try:
                    r = self.client.post(self.url, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    why = f"{type(e).__name__}: {e}"
                else:
                    if r.status_code == 200:
                        try:
                            return r.json()["choices"][0]["message"]["content"] or ""
                        except Exception as e:  # noqa: BLE001 - a 200 that is not chat-completions JSON
                            raise VlmJudgeError(f"vlm_judge: {self.url} answered 200 without "
                                                f"choices[0].message.content: {r.text[:200]!r}") from e
                    if r.status_code != 429 and r.status_code < 500:
                        raise VlmJudgeError(f"vlm_judge: {self.url} answered {r.status_code}: {r.text[:300]}")
                    why = f"HTTP {r.status_code}"
                    ra = r.headers.get("retry-after")
                    wait = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
            if attempt == self.max_retries:
                raise VlmJudgeError(f"vlm_judge: {self.url} failed after {attempt + 1} attempts: {why}")
            self._count("retries")
            time.sleep(wait if wait is not None else self.backoff_s * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _run(self, jobs: list, fn) -> list:
        """fn over jobs with at most max_concurrency in flight; each result is a value or the exception raised."""
        def safe(job):
            try:
                return fn(job)
            except Exception as e:  # noqa: BLE001 - reported per item below
                return e

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(jobs)))) as pool:
            return list(pool.map(safe, jobs))

    def _settle(self, results: list, what: list[str], fallback: float) -> list[float]:
        """Values as they are; failures -> `fallback` (required: false) or one error naming the first failure."""
        bad = [(w, r) for w, r in zip(what, results) if isinstance(r, Exception)]
        if bad and self.required:
            raise VlmJudgeError(f"{len(bad)} of {len(results)} judgements failed; first: {bad[0][0]}: {bad[0][1]}"
                                " (set vlm_judge.required=false to use fallback_score instead)")
        for w, r in bad:
            log.warning("vlm_judge: %s failed, using %s: %s", w, fallback, r)
        self._count("fallbacks", len(bad))
        return [fallback if isinstance(r, Exception) else r for r in results]

    # -- scoring ------------------------------------------------------------------------------

    def score_uint8(self, images, prompts):
        res = self._run(list(zip(images, prompts)), lambda job: parse_point(
            self._post([job[0]], self.template.format(prompt=job[1])), self.pattern, self.max_score))
        return np.array(self._settle(res, [f"image {i}" for i in range(len(images))], self.fallback_score), np.float32)

    def score_groups(self, images, prompts, groups):
        pairs = [(i, j) for g in groups for a, i in enumerate(g) for j in g[a + 1:]]
        if self.both_orders:
            pairs += [(j, i) for i, j in pairs]
        res = self._run(pairs, lambda p: parse_pair(
            self._post([images[p[0]], images[p[1]]], self.template.format(prompt=prompts[p[0]])), self.pattern))
        # With required: false a failed comparison counts as a tie.
        outcome = self._settle([r if isinstance(r, Exception) else float(r == 0) for r in res],
                               [f"pair {p}" for p in pairs], 0.5)
        wins = np.zeros(len(images))
        games = np.zeros(len(images))
        for (i, j), first_won in zip(pairs, outcome):
            wins[i] += first_won
            wins[j] += 1 - first_won
            games[i] += 1
            games[j] += 1
        return np.where(games > 0, wins / np.maximum(games, 1), 0.5)
