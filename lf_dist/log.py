"""One logger for the package: short lines on stderr, only from the main rank."""

from __future__ import annotations

import logging
import os
import sys

_configured = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be swapped, e.g. by test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def get_logger(name: str = "lf_dist") -> logging.Logger:
    global _configured
    if not _configured:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[lf-dist] %(message)s"))
        root = logging.getLogger("lf_dist")
        root.addHandler(handler)
        root.propagate = False
        # Other ranks stay quiet unless something goes wrong.
        root.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
        _configured = True
    return logging.getLogger(name)


class _Drop(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_libraries() -> None:
    """Keep the libraries' start-up chatter that says nothing to a user off the terminal: DeepSpeed guessing its
    accelerator on a machine without CUDA (told it is the CPU, through the environment its child processes
    inherit), and the hub-kernel lines bitsandbytes' CPU backend causes at import (a publisher check that offline
    mode skips, a fallback to bitsandbytes' own kernel), torchao's CUDA extensions missing on a CPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # torchao (imported by peft when installed) reports its CUDA-only extensions as failing to load on a CPU
    # machine, and registers enums with torch's pytree the way torch now calls deprecated
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop("from kernels-community"))
