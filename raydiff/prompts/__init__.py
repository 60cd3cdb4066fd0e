"""Prompt sets: packaged ones by name (licences in prompts/LICENSES) or files (.txt, .jsonl, .csv, .parquet)."""

from __future__ import annotations

import json
from pathlib import Path

PACKAGED = {
    "simple_animals": "simple_animals.txt",
    "activities": "activities.txt",
    "geneval": "geneval.txt",
    "parti": "parti.txt",
    "ocr_train": "ocr_train.txt",
    "ocr_test": "ocr_test.txt",
}


def _here() -> Path:
    return Path(__file__).parent


def load_prompts(source: str, column: str = "prompt", limit: int | None = None) -> list[str]:
    """Load prompts from a packaged set name or a file; empty sets and missing files are errors naming `prompts.source`."""
    if source in PACKAGED:
        path = _here() / PACKAGED[source]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompts.source {source!r} is neither a packaged set ({', '.join(PACKAGED)}) nor an existing file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = [str(json.loads(line)[column]) for line in path.read_text().splitlines() if line.strip()]
    elif suffix in (".csv", ".parquet"):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pq.read_table(path) if suffix == ".parquet" else pacsv.read_csv(path)
        if column not in table.column_names:
            raise ValueError(f"prompts.column {column!r} not in {path.name}; columns: {table.column_names}")
        prompts = [str(p) for p in table.column(column).to_pylist()]
    else:
        raise ValueError(f"prompts.source {source!r}: unsupported file type {suffix!r}; use .txt, .jsonl, .csv or .parquet")
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"prompts.source {source!r} holds no prompts")
    return prompts
