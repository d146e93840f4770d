"""Strategies: how a model is placed, wrapped, stepped and checkpointed on one or many processes.

The training loop only talks to a Strategy: single (one process), ddp, fsdp2 (FSDP2 / HSDP) and deepspeed
(ZeRO 0-3) implement the same interface. parallel/ imports nothing of launchers/, data/ or train/.
"""

from __future__ import annotations

import os

from lf_dist.parallel.base import Strategy
from lf_dist.parallel.single import SingleStrategy
from lf_dist.ports import free_port


def build_strategy(cfg) -> Strategy:
    """The strategy the plan chose (`cfg.train.strategy`, decided by the planner, never `auto` here)."""
    name = cfg.train.strategy
    if name == "auto":
        raise ValueError("strategy auto reached build_strategy: the plan decides the strategy before it")
    if name == "single":
        return SingleStrategy(cfg)
    if "RANK" not in os.environ:  # a distributed strategy on one process without torchrun: a group of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    if name == "ddp":
        from lf_dist.parallel.distributed import DDPStrategy

        return DDPStrategy(cfg)
    if name == "fsdp2":
        from lf_dist.parallel.fsdp2 import FSDP2Strategy

        return FSDP2Strategy(cfg)
    from lf_dist.parallel.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg)


__all__ = ["SingleStrategy", "Strategy", "build_strategy"]
