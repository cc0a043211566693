"""Small statistics for evaluation reports: means with 95% intervals, paired differences, win/tie/loss."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, Cornish-Fisher expansion beyond."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def mean_ci(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean with a t-interval; a single value has no interval (its bounds are the value)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean}
    half = t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def bootstrap_ci(values: list[float], confidence: float = 0.95, samples: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """Mean with a percentile bootstrap interval (resampling the values, seeded)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(x.mean()), "ci_low": float(low), "ci_high": float(high)}


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95, samples: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Mean of a - b over paired items with a bootstrap interval that resamples the pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b)], confidence, samples, seed)


def win_tie_loss(a: list[float], b: list[float], tolerance: float = 1e-9) -> dict[str, float]:
    """Shares of items where a beats, ties or loses to b."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win_tie_loss needs equal, non-empty lists: {len(a)} vs {len(b)}")
    wins = sum(x - y > tolerance for x, y in zip(a, b))
    losses = sum(y - x > tolerance for x, y in zip(a, b))
    return {"win": wins / len(a), "tie": (len(a) - wins - losses) / len(a), "loss": losses / len(a)}
