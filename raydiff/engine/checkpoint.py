"""Checkpoints in run storage, complete by manifest (object stores have no rename).

Layout: STORAGE/checkpoints/step_000010/{learner/..., driver.pt, config.yaml, MANIFEST.json}.
Every rank and the driver upload their files first; the driver writes MANIFEST.json
(each file's size and SHA-256) LAST. A checkpoint is complete iff its manifest exists
and every file it lists is present with the listed size; `resume: auto` takes the newest
complete one and ignores the rest (a crash mid-upload leaves a folder without a manifest).
Older local checkpoints marked by a `COMPLETE` file are still read.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import torch

from raydiff.engine.storage import Storage, join_uri, redact

MANIFEST = "MANIFEST.json"
LEGACY_COMPLETE = "COMPLETE"
ROOT = "checkpoints"


def as_storage(run: Storage | str | Path) -> Storage:
    return run if isinstance(run, Storage) else Storage(str(run))


def step_name(step: int) -> str:
    return f"{ROOT}/step_{step:06d}"


def write_file(store: Storage, rel: str, data: bytes) -> dict[str, dict]:
    """Write one file and return its manifest entry."""
    store.write_bytes(rel, data)
    return {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}


def save_checkpoint(run: Storage | str | Path, step: int, write: Callable[[Storage], dict], keep: int = 3) -> Path | str:
    """`write(step_storage) -> {file: {size, sha256}}` uploads the files; then the manifest goes last.

    Returns the checkpoint's location (a Path on local storage, else its URI).
    """
    store = as_storage(run)
    rel = step_name(step)
    store.delete(rel)  # a leftover incomplete attempt at this step (e.g. before a crash)
    step_store = store.child(rel)
    files = dict(write(step_store))
    step_store.write_bytes(MANIFEST, json.dumps({"step": step, "files": files}, indent=1, sort_keys=True).encode())
    _prune(store, keep)
    return store.locate(rel)


def _is_complete(store: Storage, rel: str) -> bool:
    if store.exists(f"{rel}/{LEGACY_COMPLETE}"):
        return True
    try:
        manifest = json.loads(store.read_bytes(f"{rel}/{MANIFEST}"))
    except (FileNotFoundError, OSError, ValueError):
        return False
    present = store.sizes(rel)
    return all(present.get(name) == entry["size"] for name, entry in manifest["files"].items())


def _step_dirs(store: Storage) -> list[str]:
    return [f"{ROOT}/{n}" for n in store.list(ROOT) if n.startswith("step_")]


def complete_checkpoints(run: Storage | str | Path) -> list[Path | str]:
    """Locations of the complete checkpoints, oldest first."""
    store = as_storage(run)
    return [store.locate(rel) for rel in _step_dirs(store) if _is_complete(store, rel)]


def latest_checkpoint(run: Storage | str | Path) -> Path | str | None:
    done = complete_checkpoints(run)
    return done[-1] if done else None


def _prune(store: Storage, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete ones older than those."""
    if keep <= 0:
        return
    steps = _step_dirs(store)
    complete = [rel for rel in steps if _is_complete(store, rel)]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for rel in steps:
        if rel < oldest_kept:
            store.delete(rel)


def resolve_resume(resume: str, run: Storage | str | Path) -> Path | str | None:
    """`never` -> None, `auto` -> latest complete checkpoint (or None), else that checkpoint (path or URI)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run)
    parent = Storage(resume)
    if not _is_complete(parent, ""):
        raise ValueError(f"output.resume={redact(resume)!r} is not a complete checkpoint (no {MANIFEST} listing files "
                         "that are all present); use auto, never or a complete step_* folder")
    return parent.locate("")


def save_driver_state(step_store: Storage, state: dict) -> dict[str, dict]:
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_file(step_store, "driver.pt", buf.getvalue())


def load_driver_state(checkpoint: Path | str) -> dict:
    data = Storage(str(checkpoint)).read_bytes("driver.pt")
    return torch.load(io.BytesIO(data), weights_only=False)


def learner_uri(checkpoint: Path | str) -> str:
    return join_uri(str(checkpoint), "learner")


def learner_weights(checkpoint: Path | str) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint's learner.pt holds (a local path or a storage URI)."""
    return torch.load(io.BytesIO(Storage(learner_uri(checkpoint)).read_bytes("learner.pt")), weights_only=False)["weights"]


def checkpoint_of(learner_location: Path | str) -> Path | str:
    """The checkpoint holding a `learner_uri` (the inverse; a URI keeps its query options)."""
    base, sep, query = str(learner_location).partition("?")
    base = base.rstrip("/")
    if not base.endswith("/learner"):
        raise ValueError(f"{redact(str(learner_location))!r} is not a checkpoint's learner folder")
    parent = base[: -len("/learner")]
    return Path(parent) if not sep and "://" not in parent else parent + sep + query
