"""FSDP2 (`fully_shard`), torchtitan style: parallelism is applied to the model from outside, in `parallelize`.

Order (each step is a small `apply_*`):
  1. activation checkpointing — already on the decoder layers (`model/adapter.py`), so it wraps what FSDP shards;
  2. `fully_shard` on every decoder layer (the model's `_no_split_modules` classes);
  3. `fully_shard` on the input embeddings (unless tied to the output layer);
  4. `fully_shard` on the root, which groups the final norm with lm_head.
A 1-D mesh shards over all ranks; a 2-D mesh (`fsdp_shard_size` < world size) is HSDP: shard within a group
of ranks (a node), replicate across groups — gradients cross the slow link once per step, weights never.

No rank holds the whole model: every rank builds it on the meta device, shards it and reads its rows of the
checkpoint (`sharded_load.py`); where the files cannot give every tensor, rank 0 builds it for real and hands
out its tensors one at a time.

Frozen weights (a LoRA or freeze base, a reference model) are stored and gathered in the compute dtype; trainable
ones keep fp32 masters that the mixed-precision policy casts for compute. A 4-bit base (QLoRA) is torchao's NF4
(`nf4.py`): every rank makes the model whole one tensor at a time, each decoder linear weight quantized as it is
read (the bf16 model never exists whole), and `fully_shard` keeps 1/N of its quantized storage per rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.model.adapter import keeps_half_precision
from lf_dist.model.loader import compute_dtype
from lf_dist.parallel import nf4, sharded_load
from lf_dist.parallel.base import decoder_layers, quantized_params, release_freed_memory
from lf_dist.parallel.distributed import DistributedStrategy

logger = get_logger(__name__)


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
    # bitsandbytes' weights would be unsharded into plain tensors without their quantization state; NF4 weights
    # shard, but not over a single rank (torch 2.13's fully_shard fails on them there), where they are whole anyway
    quantized = quantized_params(model) | (nf4.nf4_params(model) if mesh["dp_shard"].size() == 1 else set())
    if quantized:
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
        self._full_state, self._plan, self._whole = None, None, False

    quantizes_at_load = False  # a 4-bit base is quantized to NF4 after loading (create_model), not by bitsandbytes

    def load_dtype(self):
        """fp32 masters when every weight trains (bf16 compute comes from the MixedPrecisionPolicy); otherwise the
        compute dtype, which the frozen weights keep (the trainable ones are upcast to fp32 by apply_finetuning)."""
        full = self.cfg.finetuning.finetuning_type == "full" and not self.cfg.model.quantization_bit
        if full and not keeps_half_precision(self.cfg):  # pure_bf16 / BAdam train the bf16 weights themselves
            return torch.float32
        return None

    def frozen_dtype(self):
        return None  # a reference never trains: the compute dtype

    @property
    def shards(self) -> int:
        """The ranks one weight is split over (the shard group of HSDP)."""
        return self.mesh["dp_shard"].size()

    def autocast(self):
        return contextlib.nullcontext()

    def create_model(self, factory):
        if self.cfg.model.quantization_bit:  # each rank makes its own NF4 copy; fully_shard keeps its part
            self._whole = True
            return self._quantized(factory)
        return self._skeleton(factory, self.load_dtype())

    def _sources(self, skeleton, load_dtype):
        """Where each tensor comes from in the checkpoint files, or None; every rank takes the same branch (files
        in node-local caches could differ)."""
        folder = getattr(_hf_model(skeleton).config, "_name_or_path", "")
        trained = bool(self.cfg.model.adapter_name_or_path)
        sources = sharded_load.sources(skeleton, folder, load_dtype, trained) if folder else None
        return sources if self.all_reduce_sum(0 if sources is None else 1) == self.world_size else None

    def _skeleton(self, factory, load_dtype=None):
        """The model on the meta device on every rank, with where each rank reads its rows; where the files cannot
        give every tensor, rank 0 builds the model for real and keeps its tensors (the one full copy) to hand them
        out one by one after sharding."""
        skeleton = factory(True)
        self._plan = self._sources(skeleton, load_dtype or compute_dtype(self.cfg))
        if self._plan is not None:
            return skeleton
        if self.rank == 0:
            full = factory(False)
            self._full_state = {**dict(full.named_buffers()), **full.state_dict()}  # non-persistent buffers too
            del full
        return skeleton

    def _quantized(self, factory):
        """The model whole on this rank with its decoder's frozen linear weights in NF4 where the block rule lets
        them split over the shards: made tensor by tensor from the files (each weight quantized as it is read), or
        loaded whole and then quantized where the files cannot give every tensor."""
        skeleton = factory(True)
        sources = self._sources(skeleton, compute_dtype(self.cfg))
        if sources is None:
            model = factory(False)
            kept = nf4.quantize(model, decoder_layers(model), self.shards)
        else:
            model = skeleton
            make, kept = nf4.transform(model, decoder_layers(model), self.shards)
            sharded_load.materialize(model, sources, make)
        if kept and self.is_main:
            names = ", ".join(kept[:4]) + (", ..." if len(kept) > 4 else "")
            logger.info(f"NF4: {len(kept)} linear layers stay unquantized (not splittable in {self.shards}): {names}")
        return model

    def _shard_and_fill(self, model, full_state: dict, whole: bool = False):
        """Shard, then give every rank its part: its rows read from the files, or rank 0's tensors (`whole`: each
        rank made its own identical copy, and `fully_shard` keeps each rank's part)."""
        model = parallelize(model, self.mesh, self.cfg)
        if whole:
            if self.shards == 1 and not self.cfg.train.fsdp_cpu_offload:  # NF4 weights fully_shard left alone
                model.to(self.device)
            return model
        model.to_empty(device=self.device)
        sources, self._plan = self._plan, None
        if sources is not None:
            sharded_load.fill(model, sources)
        else:
            self._scatter(model, full_state)
        release_freed_memory()
        return model

    @torch.no_grad()
    def _scatter(self, model, full_state: dict) -> None:
        """Rank 0's full tensors one at a time: broadcast, each rank keeps its shard, and rank 0 drops the tensor,
        so that no rank holds more than one full tensor beyond its shards (torch's `broadcast_from_rank0` state-dict
        load allocates every full tensor on every rank at once)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if self.rank == 0:
                full = full_state.pop(name).to(self.device, tensor.dtype)
            else:
                full = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            dist.broadcast(full, src=0)
            if isinstance(tensor, DTensor):  # this rank's rows, cut locally (the values are on every rank now)
                shard = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(shard.to_local())
            else:
                tensor.copy_(full)
            del full

    def setup(self, model, build_optimizer):
        model = self._shard_and_fill(model, self._full_state or {}, self._whole)
        self._full_state, self._whole = None, False
        return model, build_optimizer(model)

    def prepare_frozen(self, factory):
        """Sharded like the policy: read in rows by every rank, or built for real on rank 0 only."""
        model = self._skeleton(factory).requires_grad_(False)
        full_state, self._full_state = self._full_state or {}, None
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
