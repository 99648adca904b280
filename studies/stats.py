"""Small statistics for study results: the mean of a few seeds and its t-interval."""

from __future__ import annotations

import math


def mean_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and the two-sided Student-t interval of the mean."""
    count = len(values)
    if count < 2:
        raise ValueError(f"an interval needs at least 2 values, got {count}")
    mean = sum(values) / count
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
    from scipy import stats  # a second of imports that only the callers of this pay

    half = float(stats.t.ppf(0.5 + confidence / 2, count - 1)) * std / math.sqrt(count)
    return {
        "n": count,
        "mean": mean,
        "std": std,
        "confidence": confidence,
        "half_width": half,
        "low": mean - half,
        "high": mean + half,
    }
