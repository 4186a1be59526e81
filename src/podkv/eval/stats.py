"""95% confidence intervals for every score the eval tables print.

Why: with tens of prompts per cell, a gap of a few points between two KV methods is usually
sampling noise. Each summary therefore carries ``{"mean", "ci95": [lo, hi], "n"}`` so a table shows
which differences are real. 0/1 scores (exact match, one-answer retrieval) use the Wilson score
interval, which stays inside [0, 1] and is sensible at 0/n and n/n; fractional scores (share of the
answers found) and means of log-likelihoods use a seeded percentile bootstrap, so a rerun writes
the same interval.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
MIN_SAMPLES = 10  # prompts per (task, length) below which a task with intervals refuses to run
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else centre - half, 1.0 if k == n else centre + half)


def weighted_mean(values, weights=None) -> float:
    values = [float(v) for v in values]
    if not values:
        return math.nan
    weights = [1.0] * len(values) if weights is None else [float(w) for w in weights]
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def bootstrap(values, weights=None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
              level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the (``weights``-weighted) mean of ``values``.

    Weights let a per-token mean be resampled by document (perplexity windows of unequal length).
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    w = np.ones_like(v) if weights is None else np.asarray(list(weights), dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    means = (v[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def describe(values, binary: bool, weights=None) -> dict:
    """``{"mean", "ci95", "n"}``: Wilson for 0/1 ``values``, bootstrap otherwise."""
    values = [float(v) for v in values]
    if binary:
        if any(v not in (0.0, 1.0) for v in values):
            raise ValueError("a Wilson interval needs 0/1 scores")
        lo, hi = wilson(int(sum(values)), len(values))
    else:
        lo, hi = bootstrap(values, weights)
    return {"mean": weighted_mean(values, weights), "ci95": [lo, hi], "n": len(values)}


def mapped(stats: dict, fn) -> dict:
    """``stats`` with ``fn`` applied to the mean and both ends (a monotone map, e.g. exp for perplexity)."""
    return {**stats, "mean": fn(stats["mean"]), "ci95": [fn(x) for x in stats["ci95"]]}
