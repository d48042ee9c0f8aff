"""Resampling statistics for results that are means over prompts or images (pure numpy, no torch).

:func:`paired_bootstrap` resamples items (prompts) with replacement, keeping each item's scores under
every variant together (paired), and reports a percentile confidence interval of any statistic of
the per-variant means, e.g. a difference of two variants or the fraction of a gap recovered. With
few prompts two models' mean ROUGE can differ by noise alone: an interval that contains 0 says so.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np


def paired_bootstrap(scores: Mapping[str, Sequence[float]], stat: Callable[[dict[str, float]], float | None],
                     reps: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float | None]:
    """``{"value", "lo", "hi"}``: ``stat`` of the per-variant means and its ``level`` percentile interval
    over ``reps`` paired resamples (resamples where ``stat`` is None or not finite are dropped; lo/hi are
    None when fewer than half remain). Every variant must have one score per item."""
    names = list(scores)
    if not names:
        raise ValueError("paired_bootstrap: no variants")
    if len({len(scores[k]) for k in names}) != 1:
        raise ValueError("paired_bootstrap: every variant needs the same, non-zero number of item scores, got "
                         + ", ".join(f"{k}: {len(scores[k])}" for k in names))
    mat = np.asarray([np.asarray(scores[k], dtype=np.float64) for k in names])
    if mat.ndim != 2 or mat.shape[1] == 0:
        raise ValueError("paired_bootstrap: every variant needs the same, non-zero number of item scores")
    if not 0 < level < 1 or reps < 1:
        raise ValueError(f"paired_bootstrap: level in (0, 1) and reps >= 1, got {level}, {reps}")
    n = mat.shape[1]
    value = stat(dict(zip(names, mat.mean(1).tolist())))
    rng = np.random.default_rng(seed)
    means = mat[:, rng.integers(0, n, size=(reps, n))].mean(2)  # [variants, reps]
    vals = []
    for j in range(reps):
        v = stat(dict(zip(names, means[:, j].tolist())))
        if v is not None and np.isfinite(v):
            vals.append(v)
    if len(vals) < reps / 2:
        return {"value": value, "lo": None, "hi": None}
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"value": value, "lo": float(lo), "hi": float(hi)}


def gap_fraction(low: float, high: float, mid: float) -> float | None:
    """(mid - low) / (high - low): how much of the low-to-high gap ``mid`` recovers (None for no gap)."""
    gap = high - low
    return (mid - low) / gap if gap != 0 else None
