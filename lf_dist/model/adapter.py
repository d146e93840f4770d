"""Make the right parameters trainable: full, freeze (last/first N layers) or LoRA / DoRA / rsLoRA via peft."""

from __future__ import annotations

import warnings

import torch

from lf_dist.config import RunConfig
from lf_dist.errors import UserError
from lf_dist.log import get_logger
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


def _apply_lora(model, cfg: RunConfig, head: Head):
    from peft import LoraConfig, PeftModel, get_peft_model

    finetuning_args = cfg.finetuning
    if cfg.model.adapter_name_or_path:
        from lf_dist.model.hub import local_model

        adapter = local_model(cfg.model.adapter_name_or_path, cfg.model, "adapter_name_or_path")
        return _lean(PeftModel.from_pretrained(model, adapter, is_trainable=True), cfg)
    targets = _split(finetuning_args.lora_target)
    config = LoraConfig(
        task_type=head.peft_task,
        r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout,
        target_modules="all-linear" if targets == ["all"] else targets,
        # peft saves SEQ_CLS's `score` by itself; a value head beside the language-model head is named here
        modules_to_save=_split(finetuning_args.additional_target)
        + [m for m in head.new_modules if head.peft_task != "SEQ_CLS"]
        or None,
        use_dora=finetuning_args.use_dora,
        use_rslora=finetuning_args.use_rslora,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # peft's message names the missing target modules
        raise UserError(f"lora_target: {str(err).splitlines()[0]}") from None
    return _lean(model, cfg)


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


def apply_finetuning(model, cfg: RunConfig, head: Head = CAUSAL_LM, quiet: bool = False):
    """Set requires_grad per method; trainable parameters are kept in fp32 (as LLaMA-Factory does).
    Works on a meta-device model too, which is how a bad freeze / lora_target setup fails before any data."""
    kind = cfg.finetuning.finetuning_type
    if is_quantized(model):
        _prepare_quantized(model, cfg)
    if cfg.model.upcast_layernorm:
        _upcast_layernorm(model)
    if kind == "lora":
        model = _apply_lora(model, cfg, head)
    elif kind == "freeze":
        _apply_freeze(model, cfg, head)
    else:
        model.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad:
            _upcast(param)
    if not cfg.finetuning.disable_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(cfg.train.gradient_checkpointing_kwargs or {})}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:  # reentrant checkpointing needs inputs that require grad
            model.enable_input_require_grads()
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    if not quiet:
        logger.info(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%) [{kind}]")
    return model
