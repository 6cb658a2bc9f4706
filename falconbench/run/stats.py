"""Summaries of repeated timings: median, p90 and the coefficient of variation (pure Python)."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default method)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, got {q}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def coefficient_of_variation(samples: Sequence[float]) -> float:
    """Sample standard deviation over the mean; 0 for a single sample."""
    if len(samples) < 2:
        return 0.0
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / mean if mean else 0.0


def summarize(samples: Sequence[float]) -> dict[str, float | int | list[float]]:
    """Median, p90, mean, CV and the samples themselves, for a row's `latency` detail."""
    return {"median": statistics.median(samples), "p90": percentile(samples, 90),
            "mean": statistics.fmean(samples), "cv": coefficient_of_variation(samples), "n": len(samples),
            "samples": list(samples)}
