"""Run metrics: JSONL (one line per step), TensorBoard scalars and image grids of samples, in run storage."""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from raydiff.engine.storage import Storage, scratch_dir

METRICS = "metrics.jsonl"


def image_grid(images: np.ndarray, captions: list[str] | None = None, cols: int | None = None) -> Image.Image:
    """Tile uint8 images (N, H, W, 3) into one picture, with a caption strip under each when given."""
    n, h, w, _ = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cap_h = 12 if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + cap_h)
        grid.paste(Image.fromarray(img), (x, y))
        if captions:
            draw.text((x + 1, y + h), captions[i][: max(4, w // 6)], fill="black")
    return grid


class MetricsLogger:
    """metrics.jsonl, TensorBoard events and image grids, all in run storage (local dir or URI).

    Object stores have no append: metrics.jsonl is rewritten whole after each step (it is small),
    so it is never half a line. TensorBoard writes events to node-local scratch and each `log`
    uploads the event files (a crash loses at most the current step). A resumed run continues
    the same metrics.jsonl, dropping lines logged after the checkpoint it resumes from.
    """

    def __init__(self, run: Storage | str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.storage = run if isinstance(run, Storage) else Storage(str(run))
        self.lines = self._existing_lines()
        if resume_step is not None:  # drop lines logged after the checkpoint we resume from, so steps never repeat
            self.lines = [line for line in self.lines if json.loads(line).get("step", 0) <= resume_step]
            self._write_jsonl()
        self.tb = None
        self._tb_dir: str | None = None
        self._tb_sizes: dict[str, int] = {}
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if self.storage.is_local:  # written in place, nothing to sync
                self._tb_dir = None
                self.tb = SummaryWriter(self.storage.path("tensorboard"))
            else:
                self._tb_dir = scratch_dir("raydiff-tb-")
                self.tb = SummaryWriter(self._tb_dir)

    def _existing_lines(self) -> list[str]:
        if not self.storage.exists(METRICS):
            return []
        return [line for line in self.storage.read_bytes(METRICS).decode().splitlines() if line.strip()]

    def _write_jsonl(self) -> None:
        self.storage.write_bytes(METRICS, "".join(line + "\n" for line in self.lines).encode())

    def _sync_tensorboard(self) -> None:
        """Upload event files that grew since the last sync (whole files: no append on object stores)."""
        if self._tb_dir is None:
            return
        for f in Path(self._tb_dir).rglob("*"):
            if f.is_file() and self._tb_sizes.get(str(f)) != f.stat().st_size:
                self._tb_sizes[str(f)] = f.stat().st_size
                self.storage.upload_file(f, f"tensorboard/{f.relative_to(self._tb_dir).as_posix()}")

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}
        self.lines.append(json.dumps({"step": step, "time": time.time(), **clean}))
        self._write_jsonl()
        if self.tb:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
            self._sync_tensorboard()

    def log_images(self, step: int, images: np.ndarray, captions: list[str]) -> Path | str:
        grid = image_grid(images, captions)
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        rel = f"samples/step_{step:06d}.png"
        self.storage.write_bytes(rel, buf.getvalue())
        if self.tb:
            self.tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")
            self.tb.flush()
            self._sync_tensorboard()
        return self.storage.locate(rel)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
            self._sync_tensorboard()
        if self._tb_dir:
            shutil.rmtree(self._tb_dir, ignore_errors=True)


def read_metrics(run: Storage | str | Path) -> list[dict]:
    """Every logged step of a run (local dir, URI or Storage)."""
    store = run if isinstance(run, Storage) else Storage(str(run))
    if not store.exists(METRICS):
        return []
    return [json.loads(line) for line in store.read_bytes(METRICS).decode().splitlines() if line.strip()]
