"""LLaMA-Factory's launch environment contract (FORCE_TORCHRUN, NNODES, NPROC_PER_NODE, ...), read in one place
by the planner, which decides the launch, and by the torchrun launcher, which carries it out."""

from __future__ import annotations

import os

from lf_dist.errors import UserError


def int_env(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}: expected an integer, got {value!r}") from None


def force_torchrun() -> bool:
    return os.environ.get("FORCE_TORCHRUN", "0").lower() in ("1", "true", "yes")
