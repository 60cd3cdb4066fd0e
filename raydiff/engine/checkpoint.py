"""Atomic checkpoints: written into a temp dir, marked complete, then renamed into place.

Layout: run_dir/checkpoints/step_000010/{learner/, driver.pt, config.yaml, COMPLETE}.
A crash mid-write leaves only a `.tmp-*` dir that `latest_checkpoint` ignores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

COMPLETE = "COMPLETE"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = 3) -> Path:
    """Call `write(tmp_dir)` to fill a checkpoint, then publish it atomically as step_{step}."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    write(tmp)
    (tmp / COMPLETE).write_text(str(step))
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`never` -> None, `auto` -> latest complete checkpoint (or None), else an existing checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if not (p / COMPLETE).is_file():
        raise ValueError(f"output.resume={resume!r} is not a complete checkpoint (no {COMPLETE} file); use auto, never or a step_* folder")
    return p


def save_driver_state(directory: Path, state: dict) -> None:
    torch.save(state, directory / "driver.pt")


def load_driver_state(directory: Path) -> dict:
    return torch.load(directory / "driver.pt", weights_only=False)
