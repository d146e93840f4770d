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


def use_ray() -> bool:
    """LLaMA-Factory's switch for Ray (`USE_RAY=1`), next to `launcher: ray` in the YAML."""
    return os.environ.get("USE_RAY", "0").lower() in ("1", "true", "yes")


# Set by a launcher in a process that retries a failed attempt of the same run (torchrun sets its own).
RESTART_ENV = "LF_DIST_RESTART_COUNT"


def restart_count() -> int:
    """How many times this run's processes were restarted after a failure: torchrun's count, or the one the
    Ray launcher passes to its workers."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get(RESTART_ENV) or 0)
