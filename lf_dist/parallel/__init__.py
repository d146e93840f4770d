"""Strategies: how a model is placed, wrapped, stepped and checkpointed on one or many processes.

The training loop only talks to a Strategy: single (one process), ddp, fsdp2 (FSDP2 / HSDP) and deepspeed
(ZeRO 0-3) implement the same interface. parallel/ imports nothing of launchers/, data/ or train/.
"""

from __future__ import annotations

import os

from lf_dist.errors import UserError
from lf_dist.parallel.base import Strategy
from lf_dist.parallel.single import SingleStrategy
from lf_dist.ports import free_port


def resolve_strategy(cfg, world_size: int) -> str:
    """The strategy key, with `auto` decided: one process → single; DeepSpeed config → deepspeed; else fsdp2."""
    name = cfg.train.strategy
    if name == "auto":
        if cfg.train.deepspeed:
            return "deepspeed"
        return "single" if world_size == 1 else "fsdp2"
    if name == "single" and world_size > 1:
        raise UserError(f"strategy single: runs one process, but {world_size} were launched; use ddp or fsdp2")
    return name


def build_strategy(cfg) -> Strategy:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    name = resolve_strategy(cfg, world_size)
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


__all__ = ["SingleStrategy", "Strategy", "build_strategy", "resolve_strategy"]
