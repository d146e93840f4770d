"""Shared machinery of multi-process strategies (process group, reductions, DCP checkpoints, export) and DDP.

Checkpoints use torch.distributed.checkpoint (DCP): every rank writes its own shards of the trainable model
state and of the optimizer state, so a checkpoint can be resumed on another world size, or even with another
of the DCP strategies (ddp ↔ fsdp2). The final model is gathered to rank 0 in CPU memory only
(`full_state_dict` + `cpu_offload`), and written by `save_pretrained` in size-limited shards.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lf_dist.errors import RunStopped
from lf_dist.parallel.base import Strategy, write_model_description
from lf_dist.parallel.formats import DCP
from lf_dist.parallel.single import is_peft


def _attempt_store(rank: int, world_size: int, timeout):
    """The rendezvous store, namespaced by torchrun's restart count.

    With static rendezvous torchrun keeps one store across restarts; without a per-attempt namespace a
    restarted group reads the previous attempt's (dead) peer addresses and cannot connect.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent_hosts,
        timeout=timeout,
        multi_tenant=not agent_hosts,
    )
    return dist.PrefixStore(f"lf_dist/attempt_{attempt}", store)


class DistributedStrategy(Strategy):
    """Base of the strategies that run one process per device under torchrun."""

    checkpoint_format = DCP
    # The data-parallel process group (None: the whole world). Tensor or pipeline parallelism will narrow it;
    # every reduction of losses, token counts and metrics, and every data shard, goes through it.
    dp_group = None

    def __init__(self, cfg):
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        super().__init__(cfg, device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=cfg.train.ddp_timeout)
            dist.init_process_group(
                backend,
                timeout=timeout,
                store=_attempt_store(self.rank, self.world_size, timeout),
                rank=self.rank,
                world_size=self.world_size,
            )

    # -- collectives over the data-parallel group ----------------------------------------------------------
    def all_reduce_sum(self, value):
        tensor = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float64)
        tensor = tensor.to(self.device)
        dist.all_reduce(tensor, group=self.dp_group)
        if torch.is_tensor(value):
            return tensor
        return int(tensor.item()) if isinstance(value, int) else float(tensor.item())

    def gather(self, value: float) -> list[float]:
        out = torch.zeros(self.dp_size, dtype=torch.float64, device=self.device)
        out[self.dp_rank] = value
        dist.all_reduce(out, group=self.dp_group)
        return out.tolist()

    def gather_objects(self, value) -> list:
        out = [None] * self.dp_size
        dist.all_gather_object(out, value, group=self.dp_group)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def teardown(self) -> None:
        if dist.is_initialized():
            # Modules that hold the group (DDP's reducer, FSDP states) sit in reference cycles: collect them while
            # every peer is still here, so the group's last reference goes with destroy_process_group.
            gc.collect()
            dist.barrier()  # nobody leaves while a peer still needs it (an explicit, clean shutdown)
            dist.destroy_process_group()

    # -- steps -------------------------------------------------------------------------------------------
    def backward(self, loss):
        # The loss is normalized by the *global* token count; the backends average gradients over the
        # data-parallel ranks, so scale by their number to get the sum the single-process run computes.
        super().backward(loss * self.dp_size)

    # -- checkpoints (DCP) -------------------------------------------------------------------------------------
    def _state_options(self, model, **kw) -> StateDictOptions:
        # LoRA / freeze: only the trainable weights change, so only they are saved (the base stays on disk).
        frozen = any(not p.requires_grad for p in model.parameters())
        return StateDictOptions(ignore_frozen_params=frozen, **kw)

    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path, save_only_model):
        inner = self.unwrap(model)
        if save_only_model:
            state = {"model": get_model_state_dict(inner, options=self._state_options(inner))}
        else:
            model_sd, optim_sd = get_state_dict(inner, optimizer, options=self._state_options(inner))
            state = {"model": model_sd, "optim": optim_sd}
        dcp.save(state, checkpoint_id=str(Path(path) / DCP.marker))
        if self.is_main:
            tokenizer.save_pretrained(path)
            write_model_description(inner, Path(path))
            if not save_only_model:
                torch.save(scheduler.state_dict(), Path(path) / "scheduler.pt")
                self.save_scaler(path)

    def load_checkpoint(self, model, optimizer, scheduler, path):
        path = Path(path)
        self.check_resumable(path)
        inner = self.unwrap(model)
        model_sd, optim_sd = get_state_dict(inner, optimizer, options=self._state_options(inner))
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / DCP.marker))
        frozen_ok = self._state_options(inner, strict=False)  # the frozen base is not in the checkpoint
        set_state_dict(
            inner, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=frozen_ok
        )
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.load_scaler(path)

    def export(self, model, tokenizer, path):
        inner = self.unwrap(model)
        adapter = is_peft(inner)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter)
        state = get_model_state_dict(inner, options=options)  # full tensors on rank 0 only, in CPU memory
        self.write_hf(inner, state, tokenizer, path)

    def write_hf(self, inner, state: dict, tokenizer, path) -> None:
        """Rank 0 writes a gathered state dict as a Hugging Face model or adapter (size-limited shards)."""
        error = None
        if self.is_main:
            shards = {} if is_peft(inner) else {"max_shard_size": self.cfg.train.save_shard_size}
            try:
                inner.save_pretrained(path, state_dict=state, **shards)
                tokenizer.save_pretrained(path)
                self.finish_export(path)
            except OSError as err:
                error = err
        if self.all_reduce_sum(1 if error else 0):  # every rank hears of it (and waits for the write)
            raise RunStopped(f"could not write the final model to {path}: {error or 'failed on rank 0'}")


class DDPStrategy(DistributedStrategy):
    """Data parallel: a full replica per rank, gradients all-reduced (DistributedDataParallel); fp16 with the
    shared GradScaler."""

    def setup(self, model, build_optimizer):
        from torch.nn.parallel import DistributedDataParallel

        model = self.place(model)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, process_group=self.dp_group)
        return ddp, build_optimizer(ddp)

    def unwrap(self, model):
        return model.module if hasattr(model, "module") else model

    def no_sync(self, model, last_micro_batch):
        return contextlib.nullcontext() if last_micro_batch else model.no_sync()
