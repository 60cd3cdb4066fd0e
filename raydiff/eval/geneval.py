"""GenEval's summary from the served `geneval` reward: per-tag strict accuracy, as its summary_scores.py.

The reward returns the partial score by default; an image is correct under GenEval's rules exactly
when that score is 1 (also true of mode `strict`; mode `flow_grpo` scores 1 only on exact counts, so
its table is the stricter exact-count accuracy). Per tag: accuracy over images; overall: the mean
of the tag accuracies (GenEval's "Overall score"); also % correct images and % prompts with at least
one correct image.
"""

from __future__ import annotations

import numpy as np

TAG_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_table(scores: np.ndarray, metadata: list[dict]) -> dict:
    """scores (P, K) of the geneval reward (NaN = failed), one metadata dict (with `tag`) per prompt."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(metadata):
        raise ValueError(f"geneval scores must be (prompts, samples) for {len(metadata)} prompts, got {scores.shape}")
    ok = scores >= 1.0 - 1e-6
    valid = ~np.isnan(scores)
    tags = {}
    present = {m["tag"] for m in metadata}
    for tag in [t for t in TAG_ORDER if t in present] + sorted(present - set(TAG_ORDER)):
        rows = [i for i, m in enumerate(metadata) if m["tag"] == tag]
        v = valid[rows]
        n = int(v.sum())
        tags[tag] = {"prompts": len(rows), "images": n, "correct": int(ok[rows][v].sum()),
                     "accuracy": float(ok[rows][v].mean()) if n else float("nan"),
                     "mean_score": float(scores[rows][v].mean()) if n else float("nan")}
    accs = [t["accuracy"] for t in tags.values() if not np.isnan(t["accuracy"])]
    return {"tags": tags, "overall": float(np.mean(accs)) if accs else float("nan"),
            "correct_images": float(ok[valid].mean()) if valid.any() else float("nan"),
            "correct_prompts": float(ok.any(axis=1).mean()), "failed_images": int((~valid).sum())}


def _f(x) -> str:
    return "nan" if x is None or x != x else f"{x:.4f}"


def geneval_markdown(section: dict) -> list[str]:
    """Markdown lines: one table per policy with a row per tag and the overall score."""
    lines = ["", "## GenEval", ""]
    if section.get("reward") is None:
        return lines + [section["note"]]
    lines += [f"Strict accuracy from the served `{section['reward']}` reward (version {section.get('version')}): "
              "an image is correct when every check passes. " + section["note"], ""]
    for label, t in section["policies"].items():
        lines += [f"### {label}", "", "| tag | prompts | images | correct | accuracy | mean score |",
                  "|---|---|---|---|---|---|"]
        for tag, r in t["tags"].items():
            lines.append(f"| {tag} | {r['prompts']} | {r['images']} | {r['correct']} | {_f(r['accuracy'])} | "
                         f"{_f(r['mean_score'])} |")
        lines += [f"| **overall (mean over tags)** | | | | **{_f(t['overall'])}** | |", "",
                  f"Correct images {_f(t['correct_images'])}; prompts with a correct image {_f(t['correct_prompts'])}.", ""]
    return lines
