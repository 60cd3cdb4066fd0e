"""Experience records: every trained sample's prompt, rewards, policy version and timings, as Parquet.

One whole Parquet file per epoch (`experience/epoch-000010.parquet`), built in memory and
written in one `Storage.write_bytes`: complete or absent, never a file without a footer.
A resumed run first drops the files of epochs after its checkpoint (the crashed run's
tail), and a re-run epoch replaces its file, so rows are never duplicated.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiff.engine.storage import Storage

DIR = "experience"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.parquet$")


def _store(run: Storage | str | Path) -> Storage:
    return run if isinstance(run, Storage) else Storage(str(run))


def epoch_files(run: Storage | str | Path) -> dict[int, str]:
    """{epoch: relative path} of the run's record files."""
    out = {}
    for name in _store(run).list(DIR):
        m = _EPOCH_FILE.match(name)
        if m:
            out[int(m.group(1))] = f"{DIR}/{name}"
    return dict(sorted(out.items()))


class ExperienceWriter:
    def __init__(self, run: Storage | str | Path, first_step: int, keep_tensors: bool = False):
        self.storage = _store(run)
        self.keep_tensors = keep_tensors
        for epoch, rel in epoch_files(self.storage).items():
            if epoch >= first_step:  # written after the checkpoint this run resumes from: replaced by the re-run
                self.storage.delete(rel)

    def write(self, step: int, batch, learner_version: int, timings: dict) -> None:
        n = len(batch)
        staleness = batch.sample_staleness().numpy().astype(np.int64)  # per sample: a batch may mix versions
        cols = {
            "step": np.full(n, step, np.int64),
            "prompt": list(batch.prompts),
            "reward": np.asarray(batch.rewards, np.float32),
            "policy_version": learner_version - staleness,
            "staleness": staleness,
        }
        for name, vals in batch.reward_components.items():
            cols[f"reward_{name}"] = np.asarray(vals, np.float32)
        if batch.group_ids is not None:
            cols["group"] = batch.group_ids.numpy().astype(np.int64)
        if batch.advantages is not None:
            cols["advantage"] = batch.advantages.numpy().astype(np.float32)
        for k, v in timings.items():
            cols[f"time_{k}"] = np.full(n, float(v), np.float64)
        if self.keep_tensors:
            cols["log_probs"] = [row.tolist() for row in batch.log_probs.numpy()]
            cols["latents"] = [row.float().numpy().astype(np.float16).tobytes() for row in batch.latents]
        buf = io.BytesIO()
        pq.write_table(pa.table(cols), buf)
        self.storage.write_bytes(f"{DIR}/epoch-{step:06d}.parquet", buf.getvalue())

    def close(self) -> None:
        """Nothing is held open: every epoch's file is complete once `write` returns."""


def read_experience(run: Storage | str | Path):
    """All of a run's experience records as one pyarrow Table (epoch order), or None."""
    store = _store(run)
    tables = [pq.read_table(io.BytesIO(store.read_bytes(rel))) for rel in epoch_files(store).values()]
    return pa.concat_tables(tables, promote_options="default") if tables else None
