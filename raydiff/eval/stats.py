"""Summary statistics for evaluation scores: mean, std, 95% CI (Student t), paired deltas.

Scores are per sample; the unit of a confidence interval is the *prompt* (per-prompt
means) when there are at least two prompts, because samples of one prompt are
correlated. No scipy: the t quantile is exact for 1 and 2 degrees of freedom and a
Cornish-Fisher expansion above (error < 1e-3 for df >= 3).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (p in (0, 1))."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def summarize(values, level: float = 0.95) -> dict:
    """{n, mean, std (ddof=1), sem, ci_low, ci_high} of a 1-D array; NaNs (failed scores) are dropped and counted."""
    x = np.asarray(values, dtype=np.float64).ravel()
    nan = int(np.isnan(x).sum())
    x = x[~np.isnan(x)]
    n = int(x.size)
    out = {"n": n, "mean": float(x.mean()) if n else float("nan"), "std": float("nan"), "sem": float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan"), "level": level}
    if nan:
        out["n_nan"] = nan
    if n >= 2:
        std = float(x.std(ddof=1))
        sem = std / math.sqrt(n)
        half = t_quantile(0.5 + level / 2, n - 1) * sem
        out.update(std=std, sem=sem, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def unit_means(scores: np.ndarray) -> np.ndarray:
    """(P, K) per-sample scores -> the CI units: per-prompt means if P >= 2, else the K samples."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (prompts, samples), got shape {scores.shape}")
    return np.nanmean(scores, axis=1) if scores.shape[0] >= 2 else scores[0]


def aggregate(scores: np.ndarray, level: float = 0.95) -> dict:
    """Summary over (P, K) scores with prompts as the unit; also the per-sample std."""
    out = summarize(unit_means(scores), level)
    out["unit"] = "prompt" if np.asarray(scores).shape[0] >= 2 else "sample"
    out["sample_std"] = summarize(scores)["std"]
    return out


def paired_delta(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """Summary of a − b over matched units (same prompts, same seeds): a paired t interval.

    `significant` says whether the CI excludes 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired delta needs equal shapes (same prompts and samples), got {a.shape} and {b.shape}")
    out = summarize(unit_means(a) - unit_means(b), level)
    out["unit"] = "prompt" if a.shape[0] >= 2 else "sample"
    out["significant"] = bool(out["n"] >= 2 and (out["ci_low"] > 0 or out["ci_high"] < 0))
    return out
