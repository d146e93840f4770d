"""The Strategy interface the training loop is written against."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch


class Strategy(ABC):
    """Owns device placement, wrapping, backward/step, reductions and (sharded) save/load.

    Knows nothing about losses: stages compute losses, the loop calls `backward` and `step`.
    """

    name = "base"
    rank = 0
    world_size = 1

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16/fp16 autocast for the forward pass when the config asks for it."""
        t = self.cfg.train
        if t.bf16 or t.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if t.bf16 else torch.float16)
        return contextlib.nullcontext()

    def no_sync(self, model, last_micro_batch: bool):
        """Skip gradient reduction on all but the last micro-batch of a step (DDP-like strategies)."""
        return contextlib.nullcontext()

    @abstractmethod
    def wrap(self, model) -> torch.nn.Module: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, model, optimizer, max_grad_norm: float) -> float:
        """Clip gradients, apply the optimizer, zero the gradients; returns the pre-clip grad norm."""

    def all_reduce_sum(self, value):
        return value

    def barrier(self) -> None:
        pass

    def unwrap(self, model) -> torch.nn.Module:
        return model

    @abstractmethod
    def save_model(self, model, tokenizer, path: Path) -> None:
        """Hugging Face format: adapter or full weights, plus the tokenizer."""

    @abstractmethod
    def save_train_state(self, optimizer, scheduler, path: Path) -> None: ...

    @abstractmethod
    def load_model_weights(self, model, path: Path) -> None: ...

    @abstractmethod
    def load_train_state(self, optimizer, scheduler, path: Path) -> None: ...

    def max_memory_allocated(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return 0

    def teardown(self) -> None:
        pass
