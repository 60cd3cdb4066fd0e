"""Write evaluation results: `eval.json` (all numbers), `eval.md` (tables), image grids (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

GENEVAL_NOTE = ("Detector: OWLv2 (transformers) instead of GenEval's Mask2Former, with GenEval's rules and "
                "thresholds; numbers are comparable within raydiff, not to published GenEval scores (docs/rewards.md).")
GENEVAL_MISSING = ("GenEval accuracy needs the `geneval` reward: add it to --rewards (e.g. --rewards geneval) with a "
                   "served app whose geneval deployment has detector_path and clip_path.")


def geneval_section(metadata: list[dict], scores: dict[str, dict[str, np.ndarray]], reward: str | None,
                    version: str | None = None) -> dict:
    """Per-policy GenEval tables from the `reward` component's (P, K) scores; a note when it was not requested."""
    from raydiff.eval.geneval import geneval_table

    if reward is None:
        return {"reward": None, "note": GENEVAL_MISSING}
    return {"reward": reward, "version": version, "note": GENEVAL_NOTE,
            "policies": {label: geneval_table(s[reward], metadata) for label, s in scores.items()}}


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _ci(s: dict) -> str:
    return f"[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"


def markdown(result: dict) -> str:
    """Aggregate table per policy, the comparison (if any), then per-prompt means."""
    lines = [f"# Evaluation: {result['prompt_set']}", "",
             f"{result['num_prompts']} prompts × {result['num_per_prompt']} samples, {result['steps']} steps, "
             f"guidance {result['guidance_scale']}, seed {result['seed']}. Rewards (served): "
             + ", ".join(f"{n}×{w:g}" for n, w in result["rewards"]) + ". CIs are 95% Student-t over "
             + ("prompts (per-prompt means)." if result["num_prompts"] >= 2 else "samples."), "",
             "| policy | reward | mean | std | 95% CI | n |", "|---|---|---|---|---|---|"]
    for label, pol in result["policies"].items():
        for name, s in pol["aggregate"].items():
            lines.append(f"| {label} | {name} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_ci(s)} | {s['n']} |")
    if "comparison" in result:
        c = result["comparison"]
        lines += ["", f"## {c['a']} − {c['b']} (paired: same prompts and noise)", "",
                  "| reward | delta | 95% CI | significant |", "|---|---|---|---|"]
        for name, s in c["delta"].items():
            lines.append(f"| {name} | {_fmt(s['mean'])} | {_ci(s)} | {'yes' if s['significant'] else 'no'} |")
    if "geneval" in result:
        from raydiff.eval.geneval import geneval_markdown

        lines += geneval_markdown(result["geneval"])
    labels = list(result["policies"])
    lines += ["", "## Per prompt (mean of total reward)", "", "| prompt | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    for i, prompt in enumerate(result["prompts"]):
        vals = [_fmt(result["policies"][lb]["per_prompt"][i]["total"]["mean"]) for lb in labels]
        lines.append(f"| {prompt.replace('|', '/')} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: str | Path, grids: dict[str, np.ndarray], captions: list[str]) -> dict[str, str]:
    """Write eval.json, eval.md and grid_<policy>.png (+ compare_grid.png for two policies); returns the paths."""
    from raydiff.engine.metrics import image_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=True))
    paths["markdown"].write_text(markdown(result))
    cols = result["num_per_prompt"]
    for label, imgs in grids.items():
        if len(imgs):
            p = paths[f"grid_{label}"] = out / f"grid_{label}.png"
            image_grid(imgs, captions[: len(imgs)], cols=cols).save(p)
    if len(grids) == 2 and all(len(g) for g in grids.values()):
        a, b = grids.values()
        n = min(len(a), len(b))
        k = result["num_per_prompt"]  # one image per prompt (sample 0): policies in rows
        first = [i for i in range(0, n, k)]
        both = np.concatenate([a[first], b[first]])
        caps = [f"{lb}: {captions[i]}" for lb in grids for i in first]
        paths["compare_grid"] = out / "compare_grid.png"
        image_grid(both, caps, cols=len(first)).save(paths["compare_grid"])
    return {k: str(v) for k, v in paths.items()}
