"""Evaluation prompt sets: packaged names, files, PartiPrompts by category, GenEval with its metadata.

Spec forms: `simple_animals`, `parti`, `parti:Animals` (category, case-insensitive),
`geneval`, or a .txt/.jsonl/.csv/.parquet path (see `raydiff.prompts.load_prompts`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

from raydiff.prompts import _here, load_prompts


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)  # one dict per prompt (category, GenEval tag/objects)


def parti_rows() -> list[dict]:
    with open(_here() / "parti_categories.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def geneval_rows() -> list[dict]:
    lines = (_here() / "geneval_metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def resolve_prompt_set(spec: str, category: str | None = None, limit: int | None = None,
                       per_tag: int | None = None) -> PromptSet:
    """Prompts (and per-prompt metadata) for `spec`; `category` filters PartiPrompts like `parti:<category>`;
    `per_tag` keeps the first N GenEval prompts of each tag."""
    if per_tag is not None and spec.partition(":")[0] != "geneval":
        raise ValueError(f"--per-tag applies to --prompts geneval only, got {spec!r}")
    name, _, cat = spec.partition(":")
    if cat and name != "parti":
        raise ValueError(f"--prompts {spec!r}: only parti takes a category (parti:Animals)")
    cat = cat or category
    if cat and name != "parti":
        raise ValueError(f"--category {cat!r} applies to --prompts parti only, got {spec!r}")
    if name == "parti":
        rows = parti_rows()
        if cat:
            cats = sorted({r["Category"] for r in rows})
            rows = [r for r in rows if r["Category"].lower() == cat.lower()]
            if not rows:
                raise ValueError(f"PartiPrompts has no category {cat!r}; categories: {', '.join(cats)}")
        rows = rows[:limit] if limit else rows
        return PromptSet(f"parti:{cat}" if cat else "parti", [r["Prompt"] for r in rows],
                         [{"category": r["Category"], "challenge": r["Challenge"]} for r in rows])
    if name == "geneval":
        rows = geneval_rows()
        if per_tag:
            counts: dict[str, int] = {}
            kept = []
            for r in rows:
                if counts.get(r["tag"], 0) < per_tag:
                    kept.append(r)
                    counts[r["tag"]] = counts.get(r["tag"], 0) + 1
            rows = kept
        rows = rows[:limit] if limit else rows
        return PromptSet("geneval", [r["prompt"] for r in rows],
                         [{k: v for k, v in r.items() if k != "prompt"} for r in rows])
    prompts = load_prompts(spec, limit=limit)
    return PromptSet(spec, prompts, [{} for _ in prompts])
