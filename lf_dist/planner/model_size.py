"""Exact model sizes from config.json alone: the architecture is built on the meta device (no weights, no
memory), so tied embeddings, grouped-query attention and biases are counted as the model really has them."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lf_dist.config.schema import ADAPTER_TYPES
from lf_dist.errors import UserError
from lf_dist.model.heads import Head
from lf_dist.model.loader import check_local


@dataclass(frozen=True)
class ModelSize:
    num_params: int  # every parameter once (tied embeddings once)
    quantizable_params: int  # weights of the decoder layers' linear layers: what bitsandbytes quantizes
    output_params: int  # lm_head / score head when it is not tied to the input embeddings
    largest_layer_params: int  # the largest decoder layer: what FSDP2 / ZeRO-3 gather at a time
    largest_linear_params: int  # the largest linear weight in a layer: what a 4/8-bit matmul dequantizes
    root_params: int  # what the root FSDP unit holds gathered through a forward (final norm, output, tied)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    uniform_layers: bool = False  # every decoder layer has the same class and parameter shapes
    # (name within its layer, rows, cols) of every decoder linear weight: which NF4 blocks split over the shards
    linear_shapes: tuple[tuple[str, int, int], ...] = ()

    def nf4_split(self, shards: int) -> tuple[int, dict[str, int]]:
        """Parameters FSDP2 holds in NF4 over `shards` ranks, and the linear layers that stay in the compute
        dtype (their blocks do not split), by name with their number of layers."""
        from lf_dist.parallel.nf4 import splits

        quantized, kept = 0, {}
        for name, rows, cols in self.linear_shapes:
            if splits(rows, cols, shards):
                quantized += rows * cols
            else:
                kept[name] = kept.get(name, 0) + 1
        return quantized, kept

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_model_config(path: str, trust_remote_code: bool = False, model_args=None):
    """The model's config.json; a hub name is resolved first (config.json alone is fetched, no weights)."""
    from transformers import AutoConfig

    if model_args is not None:
        from lf_dist.model.hub import local_model

        path = local_model(path, model_args, config_only=True)
    check_local(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"model_name_or_path: cannot read the config of '{path}' ({first})") from None


def meta_model(config, head: Head):
    """The architecture with `head`, on the meta device."""
    config = copy.deepcopy(config)
    for key, value in head.config.items():
        setattr(config, key, value if not isinstance(value, str) else getattr(config, value, None) or 0)
    with torch.device("meta"):
        return head.auto().from_config(config)


def _layers(model) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def measure(config, head: Head) -> ModelSize:
    model = meta_model(config, head)
    layers = _layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    embed = model.get_input_embeddings().weight
    tied = bool(getattr(config, "tie_word_embeddings", False))
    outside = [p for p in model.parameters() if id(p) not in in_layers and p is not embed]
    linears = [
        (name, m)
        for layer in layers
        for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and m.weight.ndim == 2
    ]
    quantizable = [m.weight for _, m in linears]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ModelSize(
        num_params=_count(model.parameters()),
        quantizable_params=_count(quantizable),
        output_params=_count(p for p in outside if p.ndim == 2),
        largest_layer_params=max((_count(layer.parameters()) for layer in layers), default=0),
        largest_linear_params=max((w.numel() for w in quantizable), default=0),
        root_params=_count(outside) + (embed.numel() if tied else 0),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate_size=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
        vocab_size=int(config.vocab_size),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        uniform_layers=_uniform(layers, int(config.num_hidden_layers)),
        linear_shapes=tuple((name, *m.weight.shape) for name, m in linears),
    )


def trainable_params(
    config, head: Head, cfg, finetuning_type: str, rank: int | None = None, size: ModelSize | None = None
) -> int:
    """Parameters the method trains, counted on the meta model the run would build (peft's LoRA included);
    `rank` overrides lora_rank; `size` (the model's ModelSize) saves measuring it again. LoRA on a model whose
    decoder layers are all alike is counted on a one-layer copy (peft's adapter injection takes seconds per
    hundred layers) and scaled to every layer."""
    finetuning = {"finetuning_type": finetuning_type, "disable_gradient_checkpointing": True}
    run_cfg = cfg.replace(
        # an adapter to continue has the shapes the config gives it
        model={"adapter_name_or_path": None, "upcast_layernorm": False},
        finetuning={**finetuning, **({"lora_rank": rank} if rank is not None else {})},
    )
    if finetuning_type == "full":
        return _count(meta_model(config, head).parameters())
    if finetuning_type in ADAPTER_TYPES:
        scaled = _lora_on_one_layer(config, head, run_cfg, size)
        if scaled is not None:
            return scaled
    return _trainable(meta_model(config, head), run_cfg, head)


def _trainable(model, run_cfg, head: Head) -> int:
    return sum(p.numel() for p in _apply(model, run_cfg, head).parameters() if p.requires_grad)


def _uniform(layers, n: int) -> bool:
    shapes = {tuple((k, tuple(v.shape)) for k, v in layer.named_parameters()) for layer in layers}
    return len(layers) == n and len(shapes) == 1 and len({type(layer) for layer in layers}) == 1


def _lora_on_one_layer(config, head: Head, run_cfg, size: ModelSize | None) -> int | None:
    """LoRA's count from a copy with one decoder layer: the parts outside the layers once, the layer's share
    times the layer count; None where the layers differ (then the whole model is counted)."""
    n = int(config.num_hidden_layers)
    size = size or measure(config, head)
    if n <= 2 or not size.uniform_layers:
        return None
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    for key, value in vars(config).items():  # per-layer lists (layer_types, ...) keep their first entry
        if isinstance(value, list) and len(value) == n:
            setattr(one, key, value[:1])
    try:
        small = meta_model(one, head)
    except Exception:  # noqa: BLE001 - a config that cannot have one layer: count the whole model
        return None
    if _count(small.parameters()) != size.num_params - (n - 1) * size.largest_layer_params:
        return None
    model = _apply(small, run_cfg, head)
    in_layer = sum(p.numel() for layer in _layers(model) for p in layer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total + (n - 1) * in_layer


def _apply(model, run_cfg, head: Head):
    from lf_dist.model.adapter import apply_finetuning

    return apply_finetuning(model, run_cfg, head, quiet=True)
