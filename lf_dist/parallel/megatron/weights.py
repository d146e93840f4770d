"""Hugging Face weights ↔ megatron-core GPTModel state dicts, one tensor-parallel rank and pipeline chunk at a time.

Layout (the rules of Megatron-Bridge's QKV and gated-MLP mappings): `linear_qkv` stacks, for each KV group g, the
query heads of g then k_g then v_g, and TP rank r holds the r-th contiguous block of those rows (whole groups when
the KV heads are a multiple of the TP size; part of one group otherwise, megatron all-gathers them);
`linear_fc1` on rank r is [gate rows of r; up rows of r]; `linear_proj`/`linear_fc2` are split on the input dim;
the embedding and output layer on vocab rows, padded with zero rows to a multiple of the TP size. The local spec
keeps `input_layernorm`/`pre_mlp_layernorm`; Transformer Engine's fuses them into linear_qkv/linear_fc1.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from lf_dist.parallel.megatron.model_map import head_dim, kv_heads, padded_vocab_size

# (local-spec name, TE-spec name, kind, HF names) per decoder layer; kind says how TP splits it
_LAYER = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", "replicated", ("input_layernorm",)),
    ("self_attention.linear_qkv.weight", None, "qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attention.linear_qkv.bias", None, "qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attention.q_layernorm.weight", None, "replicated", ("self_attn.q_norm",)),
    ("self_attention.k_layernorm.weight", None, "replicated", ("self_attn.k_norm",)),
    ("self_attention.linear_proj.weight", None, "row", ("self_attn.o_proj",)),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", "replicated", ("post_attention_layernorm",)),
    ("mlp.linear_fc1.weight", None, "fc1", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.linear_fc2.weight", None, "row", ("mlp.down_proj",)),
)
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _layer_entries(hf_config, te: bool) -> list[tuple[str, str, tuple[str, ...]]]:
    """(megatron suffix, kind, HF suffixes) of the tensors one decoder layer of this family has."""
    out = []
    for local, te_name, kind, hf in _LAYER:
        suffix = local.rsplit(".", 1)[1]
        if "linear_qkv.bias" in local and hf_config.model_type != "qwen2":
            continue
        if "_layernorm.weight" in local and "self_attention" in local and hf_config.model_type != "qwen3":
            continue
        out.append((te_name if te and te_name else local, kind, tuple(f"{h}.{suffix}" for h in hf)))
    return out


def _global_entries(hf_config, with_embedding: bool, with_output: bool) -> list[tuple[str, str, tuple[str, ...]]]:
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    out = []
    if with_embedding:
        out.append(("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",)))
    if with_output:
        out.append(("decoder.final_layernorm.weight", "replicated", ("model.norm.weight",)))
        # tied on the same stage: the output layer reuses the embedding and has no weight of its own
        if not (tied and with_embedding):
            out.append(("output_layer.weight", "vocab", ("model.embed_tokens.weight" if tied else "lm_head.weight",)))
    return out


def entries(hf_config, layer_numbers, with_embedding: bool, with_output: bool, te: bool = False):
    """Every (megatron name, kind, HF names) of one pipeline chunk; `layer_numbers`: its HF layer indices in order."""
    out = _global_entries(hf_config, with_embedding, with_output)
    for local, hf_layer in enumerate(layer_numbers):
        for name, kind, hf in _layer_entries(hf_config, te):
            out.append((f"decoder.layers.{local}.{name}", kind, tuple(f"model.layers.{hf_layer}.{h}" for h in hf)))
    return out


def megatron_param_to_hf_names(name: str, hf_config, layer_numbers=None, te: bool = False):
    """(kind, HF names) of a megatron parameter name of a chunk ("decoder.layers.0.mlp.linear_fc1.weight" →
    ("fc1", [gate_proj, up_proj] names)); `layer_numbers` maps local to HF layer indices. None if unknown."""
    match = _LAYER_NAME.match(name)
    if match:
        local, rest = int(match.group(1)), match.group(2)
        hf_layer = layer_numbers[local] if layer_numbers is not None else local
        for suffix, kind, hf in _layer_entries(hf_config, te):
            if suffix == rest:
                return kind, [f"model.layers.{hf_layer}.{h}" for h in hf]
        return None
    for suffix, kind, hf in _global_entries(hf_config, True, True) + _global_entries(hf_config, False, True):
        if suffix == name:
            return kind, list(hf)
    return None


def qkv_row_index(hf_config) -> torch.Tensor:
    """For each row of the fused linear_qkv, its row in cat([q, k, v]) (HF's q_proj, k_proj, v_proj stacked)."""
    groups, dim = kv_heads(hf_config), head_dim(hf_config)
    q_rows = hf_config.num_attention_heads * dim
    q = torch.arange(q_rows).view(groups, -1)
    k = torch.arange(groups * dim).view(groups, dim) + q_rows
    v = k + groups * dim
    return torch.cat([q, k, v], dim=1).reshape(-1)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config) -> torch.Tensor:
    """HF q/k/v (weights, biases or LoRA B matrices: rows are output features) → the global fused linear_qkv."""
    return torch.cat([q, k, v])[qkv_row_index(hf_config)]


def split_qkv(fused: torch.Tensor, hf_config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global fused linear_qkv (TP shards concatenated in rank order) → HF q, k, v."""
    stacked = torch.empty_like(fused)
    stacked[qkv_row_index(hf_config)] = fused
    q_rows, kv_rows = hf_config.num_attention_heads * head_dim(hf_config), kv_heads(hf_config) * head_dim(hf_config)
    return tuple(stacked.split([q_rows, kv_rows, kv_rows]))


def shard_fc1(gate: torch.Tensor, up: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])


def merge_fc1(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_fc1 shards of every TP rank, in rank order → HF gate, up."""
    halves = [shard.chunk(2) for shard in shards]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])


class _DictSource:
    """HF tensors held in memory."""

    def __init__(self, state_dict: dict):
        self.sd = state_dict

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        tensor = self.sd[name]
        if start is None:
            return tensor
        return tensor.narrow(dim, start, stop - start)


class _SafetensorsSource(_DictSource):
    """HF tensors in a checkpoint folder's safetensors files: only the requested rows/columns are read."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} has no model.safetensors[.index.json]: strategy megatron reads safetensors"
            )
        else:
            with safe_open(str(folder / "model.safetensors"), framework="torch") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        files = {
            f: stack.enter_context(safe_open(str(folder / f), framework="torch")) for f in set(weight_map.values())
        }
        self.slices = {name: files[f].get_slice(name) for name, f in weight_map.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slices[name].get_shape())

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        part = self.slices[name]
        if start is None:
            return part[:]
        return part[start:stop] if dim == 0 else part[:, start:stop]


def _read_qkv(source, names, hf_config, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's block of fused QKV rows, reading from each of q/k/v only the row range it contributes."""
    wanted = qkv_row_index(hf_config).chunk(tp_size)[tp_rank]
    positions, pieces, offset, lo = torch.empty_like(wanted), [], 0, 0
    for name in names:
        hi = lo + source.shape(name)[0]
        mask = (wanted >= lo) & (wanted < hi)
        if mask.any():
            start, stop = int(wanted[mask].min()) - lo, int(wanted[mask].max()) - lo + 1
            pieces.append(source.read(name, 0, start, stop))
            positions[mask] = wanted[mask] - lo - start + offset
            offset += stop - start
        lo = hi
    return torch.cat(pieces)[positions]


def _read_shard(source, kind: str, names, hf_config, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The megatron tensor of TP rank `tp_rank` built from the HF tensors `names`, reading only its slices."""
    if kind == "replicated":
        return source.read(names[0])
    if kind == "row":
        width = source.shape(names[0])[1] // tp_size
        return source.read(names[0], 1, tp_rank * width, (tp_rank + 1) * width)
    if kind == "fc1":
        rows = source.shape(names[0])[0] // tp_size
        gate, up = (source.read(n, 0, tp_rank * rows, (tp_rank + 1) * rows) for n in names)
        return torch.cat([gate, up])
    if kind == "qkv":
        return _read_qkv(source, names, hf_config, tp_rank, tp_size)
    vocab, rows = hf_config.vocab_size, padded_vocab_size(hf_config, tp_size) // tp_size
    start, stop = tp_rank * rows, min((tp_rank + 1) * rows, vocab)
    real = source.read(names[0], 0, start, stop) if stop > start else source.read(names[0], 0, 0, 0)
    pad = real.new_zeros((rows - real.shape[0], *real.shape[1:]))
    return torch.cat([real, pad])


def _merge_shards(kind: str, shards: list[torch.Tensor], hf_config) -> list[torch.Tensor]:
    """The HF tensors of one megatron tensor from its shards of every TP rank, in rank order."""
    if kind == "replicated":
        return [shards[0]]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "fc1":
        return list(merge_fc1(shards))
    if kind == "qkv":
        return list(split_qkv(torch.cat(shards), hf_config))
    return [torch.cat(shards)[: hf_config.vocab_size]]


def hf_to_megatron(
    hf_sd: dict,
    hf_config,
    tp_rank: int,
    tp_size: int,
    layer_numbers,
    with_embedding: bool,
    with_output: bool,
    te: bool = False,
) -> dict:
    """TP rank `tp_rank`'s state dict of the chunk holding HF layers `layer_numbers` (pure: for tests and tools)."""
    source = _DictSource(hf_sd)
    return {
        name: _read_shard(source, kind, hf, hf_config, tp_rank, tp_size)
        for name, kind, hf in entries(hf_config, layer_numbers, with_embedding, with_output, te)
    }


def megatron_to_hf(
    shards_per_tp_rank: list[dict],
    hf_config,
    layer_numbers,
    with_embedding: bool,
    with_output: bool,
    te: bool = False,
) -> dict:
    """The HF tensors of one chunk from its state dicts on every TP rank (in rank order); the inverse of
    `hf_to_megatron`. A tied output layer adds nothing (HF keeps only embed_tokens)."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    out = {}
    for name, kind, hf in entries(hf_config, layer_numbers, with_embedding, with_output, te):
        if name == "output_layer.weight" and tied:
            continue
        out.update(zip(hf, _merge_shards(kind, [sd[name] for sd in shards_per_tp_rank], hf_config)))
    return out


def unwrap(chunk):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def chunk_layer_numbers(model) -> list[int]:
    """The HF layer index of each decoder layer of a chunk (megatron numbers layers globally from 1)."""
    return [layer.layer_number - 1 for layer in model.decoder.layers]


def _chunk_entries(model, hf_config):
    """(megatron name, kind, HF names) of a chunk, and its tensors by name (no `_extra_state`, no tied None)."""
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    te = any(k.endswith("linear_qkv.layer_norm_weight") for k in tensors)
    found = entries(hf_config, chunk_layer_numbers(model), model.pre_process, model.post_process, te)
    unknown = set(tensors) - {name for name, _, _ in found}
    if unknown:
        raise KeyError(f"megatron parameters with no Hugging Face counterpart: {sorted(unknown)[:4]}")
    return found, tensors


def load_hf_weights(chunks, hf_config, folder: Path, te: bool = False) -> None:
    """Copy the checkpoint in `folder` into this rank's chunks, reading only this TP rank's slices of the layers
    its pipeline stages hold. `te` is read off the chunks' parameter names; kept for callers that pass it."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with contextlib.ExitStack() as stack, torch.no_grad():
        source = _SafetensorsSource(Path(folder), stack)
        for chunk in chunks:
            found, tensors = _chunk_entries(unwrap(chunk), hf_config)
            for name, kind, hf in found:
                shard = _read_shard(source, kind, hf, hf_config, tp_rank, tp_size)
                if shard.shape != tensors[name].shape:
                    raise ValueError(
                        f"{name}: checkpoint gives {tuple(shard.shape)}, model has {tuple(tensors[name].shape)}"
                    )
                tensors[name].copy_(shard)


def _gather_chunk(model, hf_config, tp_group, tp_size: int) -> dict:
    """The HF tensors of one chunk on TP rank 0 (CPU), gathered over the TP group; {} on the other TP ranks."""
    found, tensors = _chunk_entries(model, hf_config)
    out = {}
    for name, kind, hf in found:
        local = tensors[name].detach()
        if kind == "replicated":
            shards = [local]
        else:
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            torch.distributed.all_gather(shards, local.contiguous(), group=tp_group)
        if torch.distributed.get_rank(tp_group) == 0:
            if name == "output_layer.weight" and getattr(hf_config, "tie_word_embeddings", False):
                continue
            out.update(zip(hf, _merge_shards(kind, [s.cpu() for s in shards], hf_config)))
    return out


def _gather_pipeline(partial: dict, device: torch.device) -> dict | None:
    """Every pipeline stage's HF tensors on the first stage (one tensor in flight at a time); None elsewhere."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    first = parallel_state.get_pipeline_model_parallel_first_rank()
    metas = [None] * torch.distributed.get_world_size(group) if torch.distributed.get_rank() == first else None
    meta = [(name, tuple(t.shape), t.dtype) for name, t in partial.items()]
    torch.distributed.gather_object(meta, metas, dst=first, group=group)
    ranks = torch.distributed.get_process_group_ranks(group)
    if torch.distributed.get_rank() != first:
        for _, tensor in partial.items():
            torch.distributed.send(tensor.to(device).contiguous(), dst=first, group=group)
        return None
    full = dict(partial)
    for src, stage_meta in zip(ranks[1:], metas[1:]):
        for name, shape, dtype in stage_meta:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            torch.distributed.recv(buffer, src=src, group=group)
            full[name] = buffer.cpu()
    return full


def gather_hf_state_dict(chunks, hf_config) -> dict | None:
    """The full HF state dict (HF names and vocab; no lm_head.weight when tied) on global rank 0, gathered over
    TP and PP; None on every other rank. Every rank must call it."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
        return None  # the replicas with data-parallel rank 0 hold the whole model between them
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    models = [unwrap(c) for c in chunks]
    partial = {}
    for model in models:
        partial.update(_gather_chunk(model, hf_config, tp_group, tp_size))
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        partial = _gather_pipeline(partial, next(models[0].parameters()).device)
    return partial if torch.distributed.get_rank() == 0 else None
