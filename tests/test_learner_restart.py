"""Learner restarts under load (issue #14 point 3): after any restart every rank holds the restored
weights, whatever the timing.

Two ZeRO-2 ranks in Ray Train step, checkpoint, step on, then rank 1 dies mid-batch. Each time:
`run` raises LearnerRestarted (the batch in flight is dropped, never re-run on restored weights),
both ranks report the checkpoint they restored and its checksum (they compared checksums before
serving a task), and a checksum task returns exactly the checkpoint's weights on both ranks.

A CPU-bound process (started and stopped by this test) runs beside the ranks, as another job on
a busy machine would: timing changes, the result must not. RAYDIFF_RESTART_REPEATS sets the
number of restarts (CI: 1; the issue's bar, 10 in a row: RAYDIFF_RESTART_REPEATS=10).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import ray.cloudpickle

from raydiff.config import LearnerSection
from test_deepspeed_learner import TinyLearner

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
REPEATS = int(os.environ.get("RAYDIFF_RESTART_REPEATS", "1"))
BURN = "import time\nwhile True:\n    sum(i * i for i in range(100000))\n"


class CrashingLearner(TinyLearner):
    def run_task(self, task):
        if task["op"] == "crash_at":  # rank 1 dies once per marker file
            if self.rank == 1 and not os.path.exists(task["marker"]):
                open(task["marker"], "w").close()
                os._exit(1)
            return {"checksum": self._checksum()}
        if task["op"] == "checksum":
            return self._checksum()
        return super().run_task(task)


@pytest.mark.slow
def test_every_restart_restores_the_same_weights_on_every_rank(ray_cluster, tiny_sd, tmp_path):
    from raydiff.engine.learners.group import LearnerGroup, LearnerRestarted

    burner = subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True)
    group = LearnerGroup(functools.partial(CrashingLearner, model_path=tiny_sd, stage=2),
                         LearnerSection(num_workers=2, num_cpus=1), storage_path=str(tmp_path / "learner"),
                         name="restarts", max_failures=REPEATS).start().wait_ready(600)
    try:
        for i in range(REPEATS):
            group.run([{"op": "step", "seed": 10 * i + r} for r in range(2)])
            path = group.checkpoint(f"ckpt_{i:06d}")
            saved = group.run([{"op": "checksum"}] * 2)
            assert saved[0] == saved[1]
            moved = group.run([{"op": "step", "seed": 10 * i + 5 + r} for r in range(2)])
            assert moved[0]["checksum"] != saved[0]
            with pytest.raises(LearnerRestarted) as info:
                group.run([{"op": "crash_at", "marker": str(tmp_path / f"crash{i}")}] * 2)
            restored = info.value.restored
            assert info.value.generation == i + 1
            assert {v["checksum"] for v in restored.values()} == {saved[0]}, (i, restored)
            assert {v["restored"] for v in restored.values()} == {path}, (i, restored)
            assert group.run([{"op": "checksum"}] * 2) == [saved[0]] * 2, f"restart {i}: ranks differ from the checkpoint"
    finally:
        try:
            group.shutdown()
        finally:
            burner.kill()
            burner.wait()
