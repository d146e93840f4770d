"""The Strategy interface the training loop is written against."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch


class Strategy(ABC):
    """Owns processes, device placement, wrapping, backward/step, reductions and checkpoint formats.

    Knows nothing about losses: stages compute losses, the loop calls `backward` and `step`.
    """

    name = "base"
    rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model creation and wrapping --------------------------------------------------------------------
    def load_dtype(self) -> torch.dtype | None:
        """dtype to load weights in; None keeps the config's compute dtype."""
        return None

    def create_model(self, factory):
        """`factory(meta: bool)` builds the fine-tuning model; sharded strategies build it on meta on most ranks."""
        return factory(False)

    @abstractmethod
    def setup(self, model) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Place and wrap the model, and build its optimizer (over trainable parameters only)."""

    def unwrap(self, model) -> torch.nn.Module:
        return model

    def prepare_reference(self, factory) -> torch.nn.Module:
        """A frozen reference model (dpo, kto) from `factory(meta)`: by default a full copy on every device."""
        model = factory(False).to(self.device)
        return model.requires_grad_(False).eval()

    # -- one step -----------------------------------------------------------------------------------
    def autocast(self):
        """bf16/fp16 autocast for the forward pass when the config asks for it."""
        t = self.cfg.train
        if t.bf16 or t.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if t.bf16 else torch.float16)
        return contextlib.nullcontext()

    def no_sync(self, model, last_micro_batch: bool):
        """Skip gradient reduction on all but the last micro-batch of a step (where the backend allows)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already normalized by the step's global label-token count."""

    @abstractmethod
    def step(self, model, optimizer, max_grad_norm: float) -> float:
        """Clip gradients, apply the optimizer, zero the gradients; returns the pre-clip grad norm."""

    # -- collectives ----------------------------------------------------------------------------------
    def all_reduce_sum(self, value):
        return value

    def gather(self, value: float) -> list[float]:
        """One number from every rank, in rank order."""
        return [value]

    def barrier(self) -> None:  # noqa: B027 - a no-op on one process
        pass

    # -- checkpoints and export ---------------------------------------------------------------------------
    @abstractmethod
    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path: Path, save_only_model: bool) -> None:
        """Everything needed to resume, written by every rank that holds a part of it."""

    @abstractmethod
    def load_checkpoint(self, model, optimizer, scheduler, path: Path) -> None: ...

    @abstractmethod
    def export(self, model, tokenizer, path: Path) -> None:
        """The final model in Hugging Face format (adapter or full weights) plus the tokenizer."""

    def max_memory_allocated(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS on CPU
        except ImportError:  # Windows
            return 0

    def teardown(self) -> None:  # noqa: B027 - a no-op on one process
        pass
