"""The coordinator: a CPU-free task board between the driver and the Ray Train learner ranks (see
`learners.group` for the protocol), and the errors the learner group raises."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Optional

import ray

CHECKPOINT = "__raydiff_checkpoint__"  # control task: every rank saves, then reports one checkpoint
_STOP = "__raydiff_stop__"
_REREGISTER = "__raydiff_reregister__"  # the coordinator restarted: workers announce themselves again
CONTROL_TIMEOUT_S = 60.0  # a call to the (local, idle) coordinator actor


class LearnerRestarted(RuntimeError):
    """Ray Train restarted the learner workers (or the coordinator restarted): the batch in flight was
    dropped and the ranks hold the weights they restored. The driver must reset its own state to the
    same checkpoint before going on (no silent rollback)."""

    def __init__(self, group: str, generation: int, restored: dict):
        self.generation, self.restored = generation, restored
        where = sorted({str(v.get("restored")) for v in restored.values()}) if restored else ["unknown"]
        super().__init__(f"learner group {group!r} restarted (generation {generation}); ranks restored {', '.join(where)}")


class LearnerTimeout(TimeoutError):
    """A learner wait ran past its limit; the message names the role and the knob."""


@ray.remote(num_cpus=0)
class Coordinator:
    """Task board between the driver and the Train workers (async actor: waits never block others)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts this actor (its state is lost)
        self.generation = 0  # Ray Train group restarts seen
        self.restored: dict[int, dict] = {}  # rank -> what it restored at its (re)start
        self.aborted: dict[int, int] = {}  # seq -> generation that dropped it
        self.seq = -1
        self.tasks: Optional[list] = None  # pending batch, one task per rank
        self.results: dict[int, dict[int, Any]] = {}  # seq -> rank -> (worker token, result)
        # Each worker process registers a fresh token when it starts. After a group restart a
        # result from a pre-restart process is stale (its weights were rolled back) and must
        # not complete a batch together with post-restart results.
        self.current: dict[int, str] = {}
        self.stopped = False
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def put_task(self, tasks: list) -> int:
        """Post one batch (tasks[r] for rank r); returns its sequence number."""
        if len(tasks) != self.world_size:
            raise ValueError(f"got {len(tasks)} tasks for {self.world_size} learner ranks")
        if self.tasks is not None:
            raise RuntimeError(f"task batch {self.seq} is still running")
        self.seq += 1
        self.tasks = list(tasks)
        self.results[self.seq] = {}
        await self._notify()
        return self.seq

    async def get_task(self, rank: int, last_seq: int, timeout: float = 10.0, incarnation: str = ""):
        """Wait for a batch newer than `last_seq`: (seq, task), (None, STOP), (None, REREGISTER)
        if this coordinator is not the one the worker registered with, or None on timeout."""
        if incarnation and incarnation != self.incarnation:
            return (None, _REREGISTER)
        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.stopped or (self.tasks is not None and self.seq > last_seq)), timeout)
        except asyncio.TimeoutError:
            return None
        if self.stopped:
            return (None, _STOP)
        return (self.seq, self.tasks[rank])

    async def register(self, rank: int, token: str, info: Optional[dict] = None) -> str:
        """A worker process announces itself (after restoring and agreeing on weights); returns this
        coordinator's incarnation. A rank that already had a token means Ray Train restarted the
        whole group: every other rank's token is void too, even before its new process registers
        (a slow rank's pre-restart result must not complete a batch together with a fast rank's
        post-restart one), and the batch in flight is dropped, never re-run on restored weights."""
        if self.current.get(rank) is not None:
            self.generation += 1
            self.current = {r: None for r in self.current}
            if self.tasks is not None:
                self.aborted[self.seq] = self.generation
                self.results.pop(self.seq, None)
                self.tasks = None
        self.current[rank] = token
        self.restored[rank] = dict(info or {}, generation=self.generation)
        await self._notify()
        return self.incarnation

    async def status(self) -> dict:
        """incarnation, generation and what each rank restored: the driver's restart detector."""
        ready = len(self.restored) == self.world_size and all(v["generation"] == self.generation for v in self.restored.values())
        return {"incarnation": self.incarnation, "generation": self.generation, "restored": dict(self.restored), "ready": ready}

    def _complete(self, seq: int) -> bool:
        got = self.results.get(seq, {})
        return len(got) == self.world_size and all(self.current.get(r) is not None and got[r][0] == self.current[r] for r in got)

    async def put_result(self, rank: int, seq: int, result: Any, token: str = "") -> None:
        if seq not in self.results or self.current.get(rank) != token:
            return  # a stale result from before a restart (never overwrites a fresh one)
        self.results[seq][rank] = (token, result)
        if self._complete(seq):
            self.tasks = None
        await self._notify()

    async def get_results(self, seq: int, timeout: float = 1.0) -> Optional[tuple]:
        """("done", generation, results in rank order) and forgets them; ("aborted", generation, None)
        if a group restart dropped batch `seq`; None on timeout."""
        def done():
            return seq in self.aborted or self._complete(seq)

        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(done), timeout)
        except asyncio.TimeoutError:
            return None
        if seq in self.aborted:
            return ("aborted", self.aborted.pop(seq), None)
        res = self.results.pop(seq)
        return ("done", self.generation, [res[r][1] for r in range(self.world_size)])

    async def stop(self) -> None:
        self.stopped = True
        await self._notify()
