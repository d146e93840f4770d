"""Make the right parameters trainable: full, freeze (last/first N layers, or LLaMA-Pro's expanded blocks) or a peft
adapter: LoRA / DoRA / rsLoRA / PiSSA, OFT."""

from __future__ import annotations

import re
import warnings

import torch

from lf_dist.config import RunConfig
from lf_dist.config.schema import ADAPTER_TYPES
from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.model import pissa
from lf_dist.model.heads import CAUSAL_LM, Head
from lf_dist.model.loader import is_quantized

logger = get_logger(__name__)
# peft still asks for the pre-5.23 name; the warning is noise for users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _apply_freeze(model, cfg: RunConfig, head: Head) -> None:
    finetuning_args = cfg.finetuning
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not n_layers:
        raise UserError("finetuning_type freeze: the model config has no num_hidden_layers")
    k = finetuning_args.freeze_trainable_layers
    if k == 0 or abs(k) > n_layers:
        raise UserError(f"freeze_trainable_layers: must be non-zero and at most {n_layers} in absolute value, got {k}")
    if finetuning_args.use_llama_pro:
        layer_ids = llama_pro_layers(n_layers, k)
    else:
        layer_ids = range(n_layers - k, n_layers) if k > 0 else range(-k)
    modules = _split(finetuning_args.freeze_trainable_modules)
    if modules == ["all"]:
        patterns = [f".{i}." for i in layer_ids]
    else:
        patterns = [f".{i}.{mod}" for i in layer_ids for mod in modules]
    extra = _split(finetuning_args.freeze_extra_modules) + list(head.new_modules)  # a new head always trains
    matched = False
    for name, param in model.named_parameters():
        trainable = any(p in name for p in patterns) or any(name.startswith(e) or f".{e}." in name for e in extra)
        param.requires_grad_(trainable)
        matched |= trainable
    if not matched:
        raise UserError(f"freeze_trainable_modules: no parameter matches {finetuning_args.freeze_trainable_modules!r}")


def llama_pro_layers(n_layers: int, k: int) -> range:
    """The blocks LLaMA-Pro's expansion added: every (n / k)-th, the last included (LLaMA-Factory's rule)."""
    if k <= 0 or n_layers % k:
        raise UserError(
            f"use_llama_pro: freeze_trainable_layers ({k}) must be positive and divide num_hidden_layers ({n_layers})"
        )
    stride = n_layers // k
    return range(stride - 1, n_layers + stride - 1, stride)


def _layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to: the first number in its name (`model.layers.3.mlp.up_proj`)."""
    m = re.search(r"\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def _expanded_modules(model, targets: list[str], k: int) -> list[str]:
    """LLaMA-Pro with an adapter: the target modules of the expanded blocks only (find_expanded_modules)."""
    if targets == ["all"]:  # every linear layer's name; the output layer is outside the blocks anyway
        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__ and n}
        )
    layers = set(llama_pro_layers(model.config.num_hidden_layers, k))
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets and _layer_index(n) in layers]
    if not names:
        raise UserError(f"use_llama_pro: no target module in the expanded layers {sorted(layers)}")
    return names


def _targets(model, value: str | None, finetuning_args):
    targets = _split(value)
    if finetuning_args.use_llama_pro:
        return _expanded_modules(model, targets, finetuning_args.freeze_trainable_layers)
    return "all-linear" if targets == ["all"] else targets  # peft's: every linear layer but the output layer


def _peft_config(model, cfg: RunConfig, head: Head):
    """peft's LoraConfig / OFTConfig with LLaMA-Factory's keys (_setup_lora_tuning)."""
    from peft import LoraConfig, OFTConfig

    finetuning_args = cfg.finetuning
    common = {
        "task_type": head.peft_task,
        # peft saves SEQ_CLS's `score` by itself; a value head beside the language-model head is named here
        "modules_to_save": _split(finetuning_args.additional_target)
        + [m for m in head.new_modules if head.peft_task != "SEQ_CLS"]
        or None,
    }
    if finetuning_args.finetuning_type == "oft":
        return OFTConfig(
            r=finetuning_args.oft_rank,
            oft_block_size=finetuning_args.oft_block_size,
            target_modules=_targets(model, finetuning_args.oft_target, finetuning_args),
            module_dropout=finetuning_args.module_dropout,
            **common,
        )
    return LoraConfig(
        r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout,
        target_modules=_targets(model, finetuning_args.lora_target, finetuning_args),
        use_dora=finetuning_args.use_dora,
        use_rslora=finetuning_args.use_rslora,
        # a meta skeleton has nothing to decompose (and peft's full SVD fails there): shapes are the same
        init_lora_weights=True if _on_meta(model) else pissa.init_weights(finetuning_args),
        **common,
    )


def _apply_adapter(model, cfg: RunConfig, head: Head):
    from peft import PeftModel, get_peft_model

    finetuning_args = cfg.finetuning
    upcast = not keeps_half_precision(cfg)  # peft would make bf16 adapters fp32 by itself
    if cfg.model.adapter_name_or_path:
        from lf_dist.model.hub import local_model

        adapter = local_model(cfg.model.adapter_name_or_path, cfg.model, "adapter_name_or_path")
        loaded = PeftModel.from_pretrained(model, adapter, is_trainable=True, autocast_adapter_dtype=upcast)
        return _lean(loaded, cfg)
    key = "oft_target" if finetuning_args.finetuning_type == "oft" else "lora_target"
    try:
        model = get_peft_model(model, _peft_config(model, cfg, head), autocast_adapter_dtype=upcast)
    except ValueError as err:  # peft's message names the missing target modules, or a block size that does not fit
        raise UserError(f"{key}: {str(err).splitlines()[0]}") from None
    if (
        finetuning_args.finetuning_type == "lora"
    ):  # the skeleton's config says PiSSA too: sharded loads take a real build
        model.peft_config["default"].init_lora_weights = pissa.init_weights(finetuning_args)
    pissa.save_initial(model, cfg)
    return _lean(model, cfg)


def _on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def _lean(model, cfg: RunConfig):
    if cfg.finetuning.lean_lora:  # the plan's choice (kernels/lora.py); a direct caller's config leaves it off
        from lf_dist.kernels import lora

        lora.apply(model)
    return model


def _prepare_quantized(model, cfg: RunConfig) -> None:
    """The k-bit preparation QLoRA needs: the quantized base frozen, and (`upcast_layernorm`) norms in fp32.

    peft's `prepare_model_for_kbit_training` would also upcast the embeddings and the output layer to fp32
    (8.4 GB more for a 70B Llama); like LLaMA-Factory, they stay in the compute dtype."""
    model.requires_grad_(False)
    if not cfg.finetuning.disable_gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed layers of a frozen base still pass gradients


def _partitioned(param) -> bool:
    """A ZeRO-3 parameter built inside zero.Init: an empty placeholder whose shard DeepSpeed holds (and whose
    dtype its engine sets: it keeps fp32 master weights of the trainable ones itself)."""
    return hasattr(param, "ds_id")


def _numel(param) -> int:
    return param.ds_numel if _partitioned(param) else param.numel()


def _upcast(param) -> None:
    if param.dtype != torch.float32 and not _partitioned(param):
        param.data = param.data.float()


def _upcast_layernorm(model) -> None:
    for name, param in model.named_parameters():
        if len(getattr(param, "ds_shape", param.shape)) == 1 and ("norm" in name or ".ln" in name):
            _upcast(param)


def checkpointing_kwargs(cfg: RunConfig) -> dict:
    """torch.utils.checkpoint's arguments: non-reentrant unless `use_reentrant_gc` (LLaMA-Factory's key) says."""
    kwargs = {"use_reentrant": False, **(cfg.train.gradient_checkpointing_kwargs or {})}
    if cfg.model.use_reentrant_gc is not None:
        kwargs["use_reentrant"] = cfg.model.use_reentrant_gc
    return kwargs


def _enable_checkpointing(model, cfg: RunConfig) -> None:
    kwargs = checkpointing_kwargs(cfg)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if kwargs["use_reentrant"]:  # reentrant checkpointing needs inputs that require grad
        model.enable_input_require_grads()


def keeps_half_precision(cfg: RunConfig) -> bool:
    """pure_bf16 and BAdam train the bf16 weights themselves: no fp32 copy of the trainable ones (LLaMA-Factory:
    "Pure bf16 / BAdam detected, remaining trainable params in half precision")."""
    return cfg.finetuning.pure_bf16 or cfg.finetuning.use_badam


def apply_finetuning(model, cfg: RunConfig, head: Head = CAUSAL_LM, quiet: bool = False):
    """Set requires_grad per method; trainable parameters are kept in fp32 (as LLaMA-Factory does) unless
    `keeps_half_precision`. Works on a meta-device model too, which is how a bad freeze / lora_target setup fails
    before any data."""
    kind = cfg.finetuning.finetuning_type
    if is_quantized(model):
        _prepare_quantized(model, cfg)
    if cfg.model.upcast_layernorm:
        _upcast_layernorm(model)
    if kind in ADAPTER_TYPES:
        model = _apply_adapter(model, cfg, head)
    elif kind == "freeze":
        _apply_freeze(model, cfg, head)
    else:
        model.requires_grad_(True)
    if not keeps_half_precision(cfg):
        for param in model.parameters():
            if param.requires_grad:
                _upcast(param)
    if not cfg.finetuning.disable_gradient_checkpointing:
        _enable_checkpointing(model, cfg)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    if not quiet:
        logger.info(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%) [{kind}]")
    return model
