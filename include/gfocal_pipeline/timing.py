"""Latency statistics and the fps formula shared by all backends.

fps = (images timed) / (sum of timed batch latencies in seconds), warm-up batches excluded.
For the NPU tools, which report a mean time per inference (msame, ais_bench),
fps = chips * 1000 * batch / mean_ms (chips = 4 for an Atlas 300I / Ascend 310 card, as the recipe counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def latency_stats(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no timed batches: nothing to summarize (were all batches warm-up?)")
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def summarize(latencies_ms: Sequence[float], images_timed: int, batch_size: int) -> dict[str, object]:
    """-> {"fps", "latency_ms": {...}, "batch_size", "images"} for batches of `batch_size` images."""
    total_s = float(np.sum(latencies_ms)) / 1000.0
    return {
        "fps": images_timed / total_s if total_s > 0 else 0.0,
        "latency_ms": latency_stats(latencies_ms),
        "batch_size": batch_size,
        "images": images_timed,
    }
