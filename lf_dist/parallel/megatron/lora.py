"""Tensor-parallel LoRA on megatron-core's linear layers (its peft adapter: `lora_peft.py`).

A column-parallel layer (linear_qkv, linear_fc1) splits its weight by output rows: its LoRA keeps A whole
(replicated, r × in) and splits B like the weight (out/tp × r). A row-parallel layer (linear_proj, linear_fc2)
splits its weight by input columns: its LoRA splits A the same way (r × in/tp) and keeps B whole (out × r).
The collectives sit on the rank-r activation between A and B, the cheapest place:

- column: `copy_to` after A (forward: nothing; backward: all-reduce). Each rank's B shard sees only its own
  output rows, so the gradient reaching A's output is a partial sum; the all-reduce completes it, which gives
  A the same full gradient on every rank and the input the LoRA branch's full share (the base layer
  all-reduces its own share inside its autograd function, so the two add up to the unsharded input gradient);
- row: `reduce_from` after A (forward: all-reduce of A's partial sums over the input shards; backward:
  nothing). B then sees the full rank-r activation and the replicated output gradient, so its gradient is
  the full one, identical on every rank, and each A shard gets the gradient of its input columns.

With sequence parallelism the column input and the row output are split by sequence: the column LoRA
all-gathers A's output over the sequence (backward: reduce-scatter) and the row LoRA reduce-scatters it; the
replicated parameter then sums its gradient over local tokens only, and `sequence_parallel=True` asks
megatron's `finalize_model_grads` to all-reduce it over TP, as it does for layer norms.

Transformer Engine's spec fuses the layer norm into linear_qkv/linear_fc1; the LoRA branch redoes that norm
in torch, since the fused module never hands out its normalized input.

Megatron fuses q/k/v into linear_qkv and gate/up into linear_fc1, so those HF modules share one A (whose
gradient is the sum of what peft gives its q/k/v or gate/up copies); the exported peft adapter copies that A to
each and splits B back to the HF rows. Wrapping moves a base layer's parameters under `.base_layer.` in the
module's state_dict (as peft does); `sharded_state_dict` keeps their checkpoint keys those of a model without
LoRA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from lf_dist.errors import UserError

QKV, PROJ, FC1, FC2 = "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"
MEGATRON_TARGETS = (QKV, PROJ, FC1, FC2)
# the HF modules each megatron layer stands for (Llama-family names), in the order megatron fuses them
HF_NAMES = {QKV: ("q_proj", "k_proj", "v_proj"), PROJ: ("o_proj",), FC1: ("gate_proj", "up_proj"), FC2: ("down_proj",)}
_FROM_HF = {hf: target for target, names in HF_NAMES.items() for hf in names}
_PARENT = {QKV: "self_attention", PROJ: "self_attention", FC1: "mlp", FC2: "mlp"}
HF_PARENT = {QKV: "self_attn", PROJ: "self_attn", FC1: "mlp", FC2: "mlp"}
PEFT_PREFIX = "base_model.model.model.layers"


def megatron_lora_targets(lora_target: str) -> list[str]:
    """LLaMA-Factory's `lora_target` (HF or megatron names, comma-separated, or `all`) → the megatron layers
    that take LoRA, in model order. Raises UserError for a name megatron has no layer for, or a target list
    that names part of a fused group. Imports nothing of megatron (the config checks call it)."""
    return resolve_targets(str(lora_target).split(","))


def resolve_targets(names: Sequence[str]) -> list[str]:
    """`megatron_lora_targets` for a list of names."""
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise UserError("lora_target is empty; name the layers for LoRA (or use all)")
    if "all" in names:
        return list(MEGATRON_TARGETS)
    unknown = [n for n in names if n not in _FROM_HF and n not in MEGATRON_TARGETS]
    if unknown:
        known = ",".join(n for group in HF_NAMES.values() for n in group)
        raise UserError(
            f"lora_target: the megatron backend has no LoRA layer for {','.join(unknown)}; "
            f"name {known} (or megatron's {','.join(MEGATRON_TARGETS)}), or use all"
        )
    split = [
        target
        for target, group in HF_NAMES.items()
        if target not in names and any(n in names for n in group) and not all(n in names for n in group)
    ]
    if split:
        raise UserError(
            "lora_target: megatron fuses q_proj,k_proj,v_proj into linear_qkv and gate_proj,up_proj into "
            f"linear_fc1; name all of a group (or use all), not {','.join(names)}"
        )
    chosen = {_FROM_HF.get(n, n) for n in names}
    return [t for t in MEGATRON_TARGETS if t in chosen]


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


def _mark(param: torch.nn.Parameter, sharded_dim: int | None, stride: int = 1, sequence_parallel=False) -> None:
    """The attributes megatron reads off a parameter: `tensor_model_parallel` (its clip_grads and optimizer
    count a grad in the norm on every TP rank if set, else on TP rank 0 only, so a replicated adapter is not
    counted tp times), `partition_dim`/`partition_stride` (how it is split), `allreduce` (DDP reduces it over
    the dense data-parallel group, not the expert one), `sequence_parallel` (finalize_model_grads sums it
    over TP when the config runs sequence parallelism)."""
    param.tensor_model_parallel = sharded_dim is not None
    param.partition_dim = -1 if sharded_dim is None else sharded_dim
    param.partition_stride = stride
    param.allreduce = True
    if sequence_parallel:
        param.sequence_parallel = True


def _is_column(base: torch.nn.Module) -> bool:
    """Whether a megatron linear splits its output (column) or its input (row); TE's classes by name, since
    transformer_engine may be absent."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(base, ColumnParallelLinear):
        return True
    if isinstance(base, RowParallelLinear):
        return False
    name = type(base).__name__
    mode = getattr(base, "parallel_mode", None)  # TE's Linear: "column", "row" or None (duplicated)
    if "ColumnParallel" in name or mode == "column":
        return True
    if "RowParallel" in name or mode == "row":
        return False
    raise UserError(f"LoRA on the megatron backend: {name} is not a tensor-parallel linear layer")


def _fused_norm(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer norm that TE's TELayerNormColumnParallelLinear applies inside (Transformer Engine's layer spec
    fuses input_layernorm/pre_mlp_layernorm into linear_qkv/linear_fc1), redone in torch: the LoRA branch must
    see the normalized input, which the fused module never returns."""
    config = base.config
    gamma = base.layer_norm_weight
    if getattr(config, "layernorm_zero_centered_gamma", False):
        gamma = gamma + 1
    eps = config.layernorm_epsilon
    if getattr(config, "normalization", "LayerNorm") == "RMSNorm":
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()
        return y.to(x.dtype)
    bias = getattr(base, "layer_norm_bias", None)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, bias, eps)


class LoraParallelLinear(torch.nn.Module):
    """A megatron column- or row-parallel linear plus its TP-sharded LoRA branch (see the module docstring).
    Other attributes (weight, config, backward_dw, ...) read through to the wrapped layer."""

    def __init__(self, base, target: str, r: int, alpha: float, dropout: float, rslora: bool, generator):
        super().__init__()
        from megatron.core import parallel_state

        self.base_layer = base
        self.target = target
        self.column = _is_column(base)
        self.norm_inside = self.column and getattr(base, "layer_norm_weight", None) is not None
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.tp_group = (
            getattr(base, "tp_group", None)
            or getattr(base, "_tp_group", None)  # TE keeps None in tp_group at TP=1, megatron's wrapper the group
            or parallel_state.get_tensor_model_parallel_group()
        )
        self.tp, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.seq_parallel = bool(getattr(base, "sequence_parallel", False)) and self.tp > 1
        self.input_is_parallel = bool(getattr(base, "input_is_parallel", True))
        # GLU's linear_fc1 keeps [gate shard; up shard] per rank (megatron gives its weight partition_stride 2)
        self.stride = 2 if target == FC1 and getattr(getattr(base, "config", None), "gated_linear_unit", False) else 1
        weight = base.weight
        out_local, in_local = weight.shape
        # peft's init on the whole A, drawn on the CPU from this layer's own generator and then sliced, so the
        # adapter does not depend on the TP size or the device
        a_full = torch.empty(r, in_local if self.column else in_local * self.tp)
        torch.nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=generator)
        a_local = a_full if self.column else a_full.chunk(self.tp, dim=1)[self.tp_rank]
        self.lora_A = torch.nn.Parameter(a_local.to(device=weight.device, dtype=weight.dtype).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, r, device=weight.device, dtype=weight.dtype))
        if self.column:
            _mark(self.lora_A, None, sequence_parallel=self.seq_parallel)
            _mark(self.lora_B, 0, self.stride)
        else:
            _mark(self.lora_A, 1)
            _mark(self.lora_B, None, sequence_parallel=self.seq_parallel)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    def forward(self, input_, *args, **kwargs):
        output, bias = self.base_layer(input_, *args, **kwargs)
        if self.column:
            gather = kwargs.get("runtime_gather_output")
            gather = getattr(self.base_layer, "gather_output", False) if gather is None else gather
            lora = self._column_lora(_fused_norm(self.base_layer, input_) if self.norm_inside else input_, gather)
        else:
            lora = self._row_lora(input_)
        return output + lora.to(output.dtype), bias

    def _rank_local_rng(self):
        """Dropout on an input that differs between TP ranks draws from megatron's model-parallel RNG (as its
        attention dropout does); on a replicated input, from the default one, seeded alike on every TP rank,
        so that all ranks drop the same entries."""
        if not self.training or isinstance(self.lora_dropout, torch.nn.Identity) or self.tp == 1:
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        return tracker.fork() if tracker.is_initialized() else contextlib.nullcontext()

    def _column_lora(self, x: torch.Tensor, gather: bool) -> torch.Tensor:
        mappings = _mappings()
        with self._rank_local_rng() if self.seq_parallel else contextlib.nullcontext():
            x = self.lora_dropout(x)
        h = torch.nn.functional.linear(x, self.lora_A)
        if self.seq_parallel:
            h = mappings.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            h = mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        y = torch.nn.functional.linear(h, self.lora_B) * self.scaling
        return mappings.gather_from_tensor_model_parallel_region(y, group=self.tp_group) if gather else y

    def _row_lora(self, x: torch.Tensor) -> torch.Tensor:
        mappings = _mappings()
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x, group=self.tp_group)
        with self._rank_local_rng():
            x = self.lora_dropout(x)
        h = torch.nn.functional.linear(x, self.lora_A)
        if self.seq_parallel:
            h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return torch.nn.functional.linear(h, self.lora_B) * self.scaling

    def full_adapter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as one TP=1 rank would hold them, on the CPU (a collective over the TP group)."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if self.tp > 1 and self.column:
            parts = _all_gather(b, self.tp_group)
            # each rank's stride-2 shard is [gate part; up part]: regroup to [gate; up]
            b = torch.cat([torch.cat([p.chunk(self.stride)[s] for p in parts]) for s in range(self.stride)])
        elif self.tp > 1:
            a = torch.cat(_all_gather(a, self.tp_group), dim=1)
        # copies: detach() shares the parameters' storage, which the caller may go on training
        return a.to("cpu", copy=True), b.to("cpu", copy=True)

    @torch.no_grad()
    def set_full_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Load (A, B) in the TP=1 layout: this rank keeps its shard."""
        if self.column:
            b = torch.cat([part.chunk(self.tp)[self.tp_rank] for part in b.chunk(self.stride)])
        else:
            a = a.chunk(self.tp, dim=1)[self.tp_rank]
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron dist-checkpointing: the dict keys follow this module's state_dict (`base_layer.`), the
        checkpoint keys of the base weights stay those of a model without LoRA."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        base = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        out = {f"{prefix}base_layer.{key[len(prefix) :]}": value for key, value in base.items()}
        adapters = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        axes = {"lora_B": 0} if self.column else {"lora_A": 1}
        lora = make_sharded_tensors_for_checkpoint(
            adapters, prefix, axes, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        out.update(lora)
        if self.stride == 2:
            # what megatron's MLP does for linear_fc1's keys, which it no longer finds under base_layer.
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for key in (f"{prefix}base_layer.weight", f"{prefix}base_layer.bias", f"{prefix}lora_B"):
                if key in out:
                    out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets, singleton)
        return out


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(group.size())]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return parts


def unwrap_chunk(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def lora_modules(
    chunks: Sequence[torch.nn.Module], layer_offsets: Sequence[int] | None = None
) -> Iterator[tuple[int, str, LoraParallelLinear]]:
    """(global layer index, target, module) of every LoRA layer, in model order. The index is megatron's
    `layer_number - 1` (which counts the pipeline stages before this one) unless `layer_offsets` gives each
    chunk's first global layer."""
    for c, chunk in enumerate(chunks):
        decoder = getattr(unwrap_chunk(chunk), "decoder", None)
        for i, layer in enumerate(getattr(decoder, "layers", ())):
            index = layer_offsets[c] + i if layer_offsets is not None else layer.layer_number - 1
            for target in MEGATRON_TARGETS:
                module = getattr(getattr(layer, _PARENT[target], None), target, None)
                if isinstance(module, LoraParallelLinear):
                    yield index, target, module


def _init_seed(seed: int, layer: int, target: str) -> int:
    # one generator per (layer, target) so the draw is independent of which stage or rank holds the layer
    return (seed * 1_000_003 + layer * len(MEGATRON_TARGETS) + MEGATRON_TARGETS.index(target)) % (2**63)


def apply_lora(
    chunks: Sequence[torch.nn.Module],
    targets: Sequence[str],
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool = False,
    seed: int = 0,
    layer_offsets: Sequence[int] | None = None,
) -> None:
    """Wrap each targeted linear of every decoder layer in `chunks` (GPTModels, possibly wrapped) in a
    LoraParallelLinear, freeze every other parameter. Run it before megatron's DDP wraps the chunks (DDP
    allocates gradient buffers for the trainable parameters it finds)."""
    targets = resolve_targets(targets)
    if r <= 0:
        raise UserError(f"lora_rank must be positive, not {r}")
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
    for c, chunk in enumerate(chunks):
        decoder = getattr(unwrap_chunk(chunk), "decoder", None)
        for i, layer in enumerate(getattr(decoder, "layers", ())):
            index = layer_offsets[c] + i if layer_offsets is not None else layer.layer_number - 1
            for target in targets:
                parent = getattr(layer, _PARENT[target], None)
                base = getattr(parent, target, None)
                if base is None:
                    raise UserError(
                        f"lora_target: layer {index} has no {_PARENT[target]}.{target} (LoRA on MoE experts is "
                        "not supported by the megatron backend)"
                    )
                if isinstance(base, LoraParallelLinear):
                    raise RuntimeError(f"layer {index} {target} already has LoRA")
                generator = torch.Generator().manual_seed(_init_seed(seed, index, target))
                setattr(parent, target, LoraParallelLinear(base, target, r, alpha, dropout, rslora, generator))


def lora_state_dict(chunks: Sequence[torch.nn.Module], layer_offsets=None) -> dict[str, torch.Tensor]:
    """This rank's adapter shards, keyed by global layer: `decoder.layers.{i}.self_attention.linear_qkv.lora_A`."""
    out = {}
    for index, target, module in lora_modules(chunks, layer_offsets):
        key = f"decoder.layers.{index}.{_PARENT[target]}.{target}"
        out[f"{key}.lora_A"] = module.lora_A.detach()
        out[f"{key}.lora_B"] = module.lora_B.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(chunks: Sequence[torch.nn.Module], state: dict[str, torch.Tensor], layer_offsets=None):
    """Copy `lora_state_dict`'s tensors (saved with the same TP layout) back into the adapters."""
    expected = lora_state_dict(chunks, layer_offsets)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"the LoRA checkpoint lacks {len(missing)} adapter tensors, first {missing[0]}")
    for key, param in expected.items():
        param.copy_(state[key])
