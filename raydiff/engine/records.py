"""Experience records: every trained sample's prompt, rewards, policy version and timings, as Parquet.

One file per run segment (`experience/part-<first step>.parquet`), one row group
per epoch, so a resumed run adds a file instead of rewriting one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class ExperienceWriter:
    def __init__(self, run_dir: str | Path, first_step: int, keep_tensors: bool = False):
        self.dir = Path(run_dir) / "experience"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"part-{first_step:06d}.parquet"
        self.keep_tensors = keep_tensors
        self.writer: pq.ParquetWriter | None = None

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
        table = pa.table(cols)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.path), table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_experience(run_dir: str | Path):
    """All parts of a run's experience records as one pyarrow Table."""
    files = sorted((Path(run_dir) / "experience").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None
