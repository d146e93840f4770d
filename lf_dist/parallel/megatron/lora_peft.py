"""The peft adapter of megatron's tensor-parallel LoRA, on the Hugging Face names: gathered over TP and PP to
global rank 0 for export, loaded from a peft adapter to go on training, and its LoraConfig.

Megatron fuses q/k/v into linear_qkv and gate/up into linear_fc1, so those HF modules share one A: the exported
adapter copies it to each and splits B back to the HF rows; an adapter to load must share A within each group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lf_dist.errors import UserError
from lf_dist.parallel.megatron.lora import (
    FC1,
    HF_NAMES,
    HF_PARENT,
    PEFT_PREFIX,
    QKV,
    lora_modules,
    resolve_targets,
    unwrap_chunk,
)


def _split_b(target: str, b: torch.Tensor, hf_config, gated: bool) -> list[tuple[str, torch.Tensor]]:
    """A TP=1 megatron B → (HF module, its B rows)."""
    from lf_dist.parallel.megatron.weights import split_qkv

    if target == QKV:
        return list(zip(HF_NAMES[QKV], split_qkv(b, hf_config)))
    if target == FC1:
        return list(zip(HF_NAMES[FC1], b.chunk(2))) if gated else [("up_proj", b)]
    return [(HF_NAMES[target][0], b)]


def _fuse_b(target: str, parts: list[torch.Tensor], hf_config) -> torch.Tensor:
    """`_split_b`'s inverse."""
    from lf_dist.parallel.megatron.weights import fuse_qkv

    return fuse_qkv(*parts, hf_config) if target == QKV else torch.cat(parts)


def _gated(chunks) -> bool:
    config = getattr(unwrap_chunk(chunks[0]), "config", None) if chunks else None
    return bool(getattr(config, "gated_linear_unit", True))


def _gather_to_rank0(local: dict) -> dict | None:
    """Merge each pipeline stage's dict on global rank 0 (the TP-0, DP-0 ranks send; the others hold copies)."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return None
    group = ps.get_pipeline_model_parallel_group()
    if group.size() == 1:
        return local if dist.get_rank() == 0 else None
    parts = [None] * group.size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0, group=group)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def gather_peft_adapter(chunks: Sequence[torch.nn.Module], hf_config, layer_offsets=None) -> dict | None:
    """The whole adapter as a peft state dict (HF module names) on global rank 0, None on the other ranks.
    A collective: every rank of the world calls it."""
    full = {(index, target): module.full_adapter() for index, target, module in lora_modules(chunks, layer_offsets)}
    full = _gather_to_rank0(full)
    if full is None:
        return None
    gated = _gated(chunks)
    out = {}
    for (index, target), (a, b) in sorted(full.items()):
        prefix = f"{PEFT_PREFIX}.{index}.{HF_PARENT[target]}"
        for name, part in _split_b(target, b, hf_config, gated):
            out[f"{prefix}.{name}.lora_A.weight"] = a.clone()
            out[f"{prefix}.{name}.lora_B.weight"] = part.contiguous()
    return out


def load_peft_adapter(chunks: Sequence[torch.nn.Module], hf_config, state: dict, layer_offsets=None) -> None:
    """Load a peft adapter state dict (HF names, as `gather_peft_adapter` writes) into the LoRA layers; every
    rank calls it with the whole dict and keeps its shards. The HF modules megatron fuses must share A."""
    state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    gated = _gated(chunks)
    for index, target, module in lora_modules(chunks, layer_offsets):
        prefix = f"{PEFT_PREFIX}.{index}.{HF_PARENT[target]}"
        names = HF_NAMES[target] if target != FC1 or gated else ("up_proj",)
        try:
            a_parts = [state[f"{prefix}.{n}.lora_A.weight"] for n in names]
            b_parts = [state[f"{prefix}.{n}.lora_B.weight"] for n in names]
        except KeyError as err:
            raise UserError(f"the adapter has no {err.args[0]}; its lora_target must cover {target}") from None
        if any(not torch.equal(a, a_parts[0]) for a in a_parts[1:]):
            raise UserError(
                f"the adapter's {','.join(names)} of layer {index} have different lora_A; megatron fuses them into "
                f"{target}, which has one"
            )
        module.set_full_adapter(a_parts[0], _fuse_b(target, b_parts, hf_config))


def adapter_config(hf_config, targets: Sequence[str], r: int, alpha: float, dropout: float, rslora: bool = False):
    """The peft.LoraConfig of the adapter `gather_peft_adapter` writes (target_modules in HF names)."""
    from peft import LoraConfig

    modules = [name for target in resolve_targets(targets) for name in HF_NAMES[target]]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        target_modules=modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
    )
