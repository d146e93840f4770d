"""FSDP2 (`fully_shard`), torchtitan style: parallelism is applied to the model from outside, in `parallelize`.

Order (each step is a small `apply_*`):
  1. activation checkpointing — already on the decoder layers (`model/adapter.py`), so it wraps what FSDP shards;
  2. `fully_shard` on every decoder layer (the model's `_no_split_modules` classes);
  3. `fully_shard` on the input embeddings (unless tied to the output layer);
  4. `fully_shard` on the root, which groups the final norm with lm_head.
A 1-D mesh shards over all ranks; a 2-D mesh (`fsdp_shard_size` < world size) is HSDP: shard within a group
of ranks (a node), replicate across groups — gradients cross the slow link once per step, weights never.

Large models never exist in full on every rank: rank 0 loads the checkpoint, the other ranks build the model
on the meta device; after sharding, rank 0 broadcasts the weights and each rank keeps only its shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lf_dist.errors import UserError
from lf_dist.parallel.base import decoder_layers, quantized_params
from lf_dist.parallel.distributed import DistributedStrategy


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_mesh(device_type: str, world_size: int, shard_size: int | None):
    from torch.distributed.device_mesh import init_device_mesh

    if not shard_size or shard_size >= world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    if world_size % shard_size:
        raise UserError(f"fsdp_shard_size: {shard_size} must divide the world size {world_size}")
    return init_device_mesh(
        device_type, (world_size // shard_size, shard_size), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def apply_fsdp(model, mesh, mp_policy, reshard_after_forward: bool, offload: bool) -> None:
    kwargs = {"mesh": mesh, "mp_policy": mp_policy, "reshard_after_forward": reshard_after_forward}
    quantized = quantized_params(model)
    if quantized:  # FSDP2 would unshard them into plain tensors without their quantization state
        kwargs["ignored_params"] = quantized
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    hf = _hf_model(model)
    if not getattr(hf.config, "tie_word_embeddings", False):
        fully_shard(hf.get_input_embeddings(), **kwargs)
    fully_shard(model, **kwargs)  # root: final norm + lm_head (+ tied embeddings)


def mixed_precision(cfg) -> MixedPrecisionPolicy:
    """Compute in bf16 / fp16 with fp32 master weights and fp32 gradient reduction; fp32 without either."""
    training_args = cfg.train
    if training_args.bf16 or training_args.fp16:
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if training_args.bf16 else torch.float16, reduce_dtype=torch.float32
        )
    return MixedPrecisionPolicy()


def parallelize(model, mesh, cfg) -> torch.nn.Module:
    """Apply the parallelisms in the documented order; the model code is untouched."""
    training_args = cfg.train
    apply_fsdp(
        model, mesh, mixed_precision(cfg), training_args.fsdp_reshard_after_forward, training_args.fsdp_cpu_offload
    )
    return model


class FSDP2Strategy(DistributedStrategy):
    """FSDP2 / HSDP. fp16 uses the shared GradScaler: its inf check runs on the sharded (DTensor) gradients
    and is reduced over the mesh, so every rank skips the same steps."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mesh = build_mesh(self.device.type, self.world_size, cfg.train.fsdp_shard_size)
        self._full_state = None

    def load_dtype(self):
        # fp32 master weights; bf16 compute comes from the MixedPrecisionPolicy, not from casting the weights.
        return torch.float32

    def autocast(self):
        return contextlib.nullcontext()

    def create_model(self, factory):
        if self.cfg.model.quantization_bit:  # quantization state cannot be broadcast: every rank loads its own
            return factory(False)
        if self.rank == 0:
            model = factory(False)
            self._full_state = dict(model.state_dict())  # the one full copy, broadcast after sharding
            return model
        return factory(True)

    def _shard_and_fill(self, model, full_state: dict):
        """Shard, then give every rank its part of rank 0's weights (a quantized model: each rank loaded its own,
        identical weights, and keeps its quantized base whole)."""
        if quantized_params(model):
            return parallelize(model, self.mesh, self.cfg)
        model = parallelize(model, self.mesh, self.cfg)
        if self.rank != 0:
            model.to_empty(device=self.device)
        elif self.device.type == "cuda":
            model.to(self.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
        for buf in model.buffers():  # non-persistent buffers (rotary tables) are not in the state dict
            dist.broadcast(buf.data, src=0)
        return model

    def setup(self, model, build_optimizer):
        model = self._shard_and_fill(model, self._full_state or {})
        self._full_state = None
        return model, build_optimizer(model)

    def prepare_frozen(self, factory):
        """Sharded like the policy: loaded on rank 0 only, never whole on the other ranks."""
        model = factory(self.rank != 0).requires_grad_(False)
        full_state = dict(model.state_dict()) if self.rank == 0 else {}
        return self._shard_and_fill(model, full_state).eval()

    def generate(self, model, prompts, **gen):
        """Every FSDP unit unsharded once for the call and kept so for each token's forward: generation then needs
        no collective, so a rank whose completions end early never waits for the others."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # transformers' generate calls the causal LM inside the root (peft's wrapper), never the root itself: the
        # root must know it is the root before an inner unit's forward runs first and takes that role
        model._get_fsdp_state()._lazy_init()
        model.set_reshard_after_forward(False)
        for unit in units:
            unit.unshard()
        try:
            return super().generate(model, prompts, **{**gen, "synced_gpus": False})
        finally:
            for unit in units:
                unit.reshard()
            model.set_reshard_after_forward(self.cfg.train.fsdp_reshard_after_forward)

    def no_sync(self, model, last_micro_batch):
        model.set_requires_gradient_sync(last_micro_batch)  # reduce-scatter once per step
        return contextlib.nullcontext()
