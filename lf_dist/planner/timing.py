"""How `lf-dist env --calibrate` times its measurements: rates over repeated calls, the best of three rounds."""

from __future__ import annotations

import time

SECONDS = 0.4  # per measurement; each is the best of three such windows


def best_rate(work, units: float) -> float:
    """Units per second of `work()`, the best of three windows (the fastest is the least disturbed)."""
    work()
    best = 0.0
    for _ in range(3):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < SECONDS:
            work()
            n += 1
        best = max(best, units * n / (time.perf_counter() - start))
    return best


def fixed_rate(work, units: float, n: int) -> float:
    """Units per second of `work()` over `n` calls after one warm-up, the best of three rounds. A fixed count, not
    a time window: every rank of a collective must call it as often as the others, or they wait forever."""
    work()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            work()
        best = max(best, units * n / (time.perf_counter() - start))
    return best


def synchronizer(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
