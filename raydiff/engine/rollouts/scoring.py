"""Reward requests in flight next to sampling: a rollout worker never idles on scoring.

A `ScoringJob` holds one reward call (images + prompts) on a thread pool. The worker submits
jobs as soon as images exist and collects them later, so the GPU samples the next batch
while the reward service (or an in-process reward on the pool's thread) scores this one.
`result()` re-sends a failed request: the images are kept until their scores arrive, so a
scoring failure costs a re-score, never a re-sample. Failures that would fail again (a
malformed request, an item the reward rejects) are raised at once.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

log = logging.getLogger("raydiff.scoring")


def _permanent(err: BaseException) -> bool:
    """Errors a re-send cannot fix: the service's 4xx / item errors, and bad arguments."""
    from raydiff.rewards.client import RewardServiceError

    if isinstance(err, RewardServiceError):
        return err.status is not None and err.status < 500
    return isinstance(err, (ValueError, TypeError))


class ScoringJob:
    """One reward call `rewards(images, prompts) -> (total (N,), {name: (N,)})` running on `pool`."""

    def __init__(self, pool: ThreadPoolExecutor, rewards, images: np.ndarray, prompts: list[str],
                 max_retries: int = 3, backoff_s: float = 0.2):
        self.pool, self.rewards, self.images, self.prompts = pool, rewards, images, list(prompts)
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.attempts = 0
        self.submitted_at = time.perf_counter()
        self.done_at = self.submitted_at
        self._submit()

    def _submit(self) -> None:
        self.attempts += 1
        self.future: Future = self.pool.submit(self.rewards, self.images, self.prompts)
        self.future.add_done_callback(self._stamp)

    def _stamp(self, _future) -> None:
        self.done_at = time.perf_counter()

    def result(self) -> tuple[np.ndarray, dict]:
        """The scores; re-sends the same images after a transient failure, up to `max_retries` times."""
        while True:
            try:
                total, parts = self.future.result()
                self.images = None  # scored: release the images
                return np.asarray(total, np.float32), parts
            except Exception as err:  # noqa: BLE001 - classified below
                if _permanent(err) or self.attempts > self.max_retries:
                    raise
                log.warning("scoring failed (%s: %s); re-sending %d images (attempt %d of %d)",
                            type(err).__name__, err, len(self.images), self.attempts + 1, self.max_retries + 1)
                time.sleep(self.backoff_s * 2 ** (self.attempts - 1))
                self._submit()


def scoring_pool(max_in_flight: int) -> ThreadPoolExecutor:
    """Threads for reward calls: two per batch that may be in flight (final images and x̂_0 chunks overlap)."""
    return ThreadPoolExecutor(max_workers=max(2, 2 * max_in_flight), thread_name_prefix="raydiff-scoring")
