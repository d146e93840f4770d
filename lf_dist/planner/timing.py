"""How `lf-dist env --calibrate` times its measurements: rates over repeated calls, the median of five rounds (a
shared machine's speed drifts: the median is what a step meets most of the time, as the steps' median)."""

from __future__ import annotations

import statistics
import time

SECONDS = 0.2  # per window; a measurement is the median of ROUNDS such windows
ROUNDS = 5


def median_rate(work, units: float) -> float:
    """Units per second of `work()`, the median of ROUNDS windows after one warm-up call."""
    work()
    rates = []
    for _ in range(ROUNDS):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < SECONDS:
            work()
            n += 1
        rates.append(units * n / (time.perf_counter() - start))
    return statistics.median(rates)


def fixed_rate(work, units: float, n: int) -> float:
    """Units per second of `work()` over `n` calls after one warm-up, the median of ROUNDS rounds. A fixed count,
    not a time window: every rank of a collective must call it as often as the others, or they wait forever."""
    work()
    rates = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(n):
            work()
        rates.append(units * n / (time.perf_counter() - start))
    return statistics.median(rates)


def synchronizer(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
