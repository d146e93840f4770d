"""Strategies: how a model is placed, wrapped, stepped and checkpointed on one or many processes.

The training loop only talks to a Strategy: single (one process), ddp, fsdp2 (FSDP2 / HSDP) and deepspeed
(ZeRO 0-3) implement the same interface, and each is one spec in `registry.py`; their checkpoint formats are in
`formats.py`. parallel/ imports nothing of launchers/, data/ or train/. Importing this package loads no strategy
module (serving reads `formats` without them); the names below load on first use.
"""

from __future__ import annotations

from lf_dist.parallel.registry import build_strategy


def __getattr__(name: str):
    if name == "Strategy":
        from lf_dist.parallel.base import Strategy

        return Strategy
    if name == "SingleStrategy":
        from lf_dist.parallel.single import SingleStrategy

        return SingleStrategy
    raise AttributeError(name)


__all__ = ["SingleStrategy", "Strategy", "build_strategy"]
