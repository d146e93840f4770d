"""Strategies: how a model is placed, wrapped, stepped and saved on one or many processes.

The training loop only talks to a Strategy. This package ships the single-process strategy; distributed
ones (ddp, fsdp2, deepspeed, megatron) implement the same interface.
"""

from lf_dist.parallel.base import Strategy
from lf_dist.parallel.single import SingleStrategy


def build_strategy(cfg) -> Strategy:
    return SingleStrategy(cfg)


__all__ = ["SingleStrategy", "Strategy", "build_strategy"]
