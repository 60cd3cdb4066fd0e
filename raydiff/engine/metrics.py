"""Run metrics: JSONL (one line per step), TensorBoard scalars and image grids of samples."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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
    """Appends to metrics.jsonl (resumed runs continue the same file) and TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from, so steps never repeat."""
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.tb:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def log_images(self, step: int, images: np.ndarray, captions: list[str]) -> Path:
        grid = image_grid(images, captions)
        out = self.run_dir / "samples" / f"step_{step:06d}.png"
        out.parent.mkdir(exist_ok=True)
        grid.save(out)
        if self.tb:
            self.tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return out

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
