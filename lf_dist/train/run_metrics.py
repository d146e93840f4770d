"""What the loop measures about the run itself, beyond the stage's metrics: memory per rank against the plan, and a
rollout stage's throughput. Every function is called by every rank (each gathers over the data-parallel group)."""

from __future__ import annotations

import torch

from lf_dist.parallel.base import weight_bytes


def memory_log(strategy, planned_peak_gb: float | None) -> dict:
    """The plan's peak estimate next to the measured peak (CUDA allocated, or CPU process RSS), in GiB."""
    peak = strategy.max_memory_allocated() / 2**30
    out = {"peak_memory_gb": round(peak, 3)}
    if planned_peak_gb is not None:
        out["planned_peak_memory_gb"] = planned_peak_gb
    if strategy.dp_size > 1:
        peaks = strategy.gather(peak)
        out.update(peak_memory_gb_per_rank=[round(x, 3) for x in peaks], world_size=len(peaks))
    return out


def per_rank_memory(strategy, model) -> dict:
    """Each rank's weights (its local storage: shards where sharded) and peak memory, measured, in rank order."""
    weights = strategy.gather(float(weight_bytes(model)))
    peaks = strategy.gather(strategy.max_memory_allocated() / 2**30)
    return {
        "weight_bytes_per_rank": [int(w) for w in weights],
        "peak_memory_gb_per_rank": [round(x, 3) for x in peaks],
    }


def rollout_throughput(strategy, totals: dict) -> dict:
    """Rollout stages: tokens generated per second of generating, and tokens updated on per second of updating
    (every rank's tokens over the ranks' mean seconds); nothing for the other stages."""
    if not totals:
        return {}
    keys = ("generated_tokens", "generating_s", "updating_s")  # this rank's; update_tokens is global already
    summed = strategy.all_reduce_sum(torch.tensor([float(totals.get(k, 0)) for k in keys]).double())
    tokens, gen_s, update_s = (float(x) for x in summed.cpu())
    update_tokens, world = totals.get("update_tokens", 0), strategy.dp_size
    return {
        "generated_tokens_per_second": round(tokens / max(gen_s / world, 1e-9), 2),
        "update_tokens_per_second": round(update_tokens / max(update_s / world, 1e-9), 2),
    }
