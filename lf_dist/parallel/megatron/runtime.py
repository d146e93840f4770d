"""Where megatron-core's layers run: a CUDA device, or nothing. The tests' CPU shim (tests/megatron_shim.py)
replaces these two functions; nothing in lf_dist patches torch.cuda."""

from __future__ import annotations

import importlib.util
import os

import torch


def device() -> torch.device | None:
    """This rank's device for megatron-core's layers, or None where they cannot run (no CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def has_cuda() -> bool:
    """CUDA itself (the distributed optimizer's buffers need it even where the shim runs the layers)."""
    return torch.cuda.is_available()


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None
