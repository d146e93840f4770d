"""Launchers: how the worker processes are started. Every launcher ends in `lf_dist.worker.run` on every rank.

- in-process: one process (CPU or one GPU), or already inside a torchrun-started rank;
- torchrun: `torch.distributed.run` on this node, single- or multi-node, static or elastic (LLaMA-Factory's
  environment contract: FORCE_TORCHRUN, NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_ID,
  MIN_NNODES, MAX_NNODES, MAX_RESTARTS).
- ray: a Ray Train job (`ray_train.py`) on an existing cluster (RAY_ADDRESS, `ray_init_kwargs`) or a local one.
Which one runs is the plan's decision (`plan.launcher`); the ranks and Ray workers run the parent's plan.
"""

from __future__ import annotations

import os

from lf_dist import startup
from lf_dist.launchers.torchrun import launch_torchrun


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def launch(config_path: str, overrides: list[str], cfg, plan) -> int:
    """Run training for a validated config as the plan says (`plan.launcher`); returns the exit code."""
    if plan.launcher == "ray":
        from lf_dist.launchers.ray_train import launch_ray

        startup.settle()  # a driver that waits for hours collects its garbage as usual
        return launch_ray(config_path, overrides, cfg, plan)
    if plan.launcher == "torchrun" and not inside_torchrun():
        startup.settle()
        return launch_torchrun(config_path, overrides, cfg, plan)
    from lf_dist.worker import run

    run(cfg, plan)
    return 0


__all__ = ["inside_torchrun", "launch", "launch_torchrun"]
