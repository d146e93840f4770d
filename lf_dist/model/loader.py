"""Tokenizer and model from a local checkpoint, with dtype and attention chosen from the config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from lf_dist.config import RunConfig
from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.model.heads import CAUSAL_LM, Head

logger = get_logger(__name__)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_local(path: str, key: str = "model_name_or_path") -> None:
    """A local Hugging Face checkpoint folder (with config.json); hub names are resolved before (model/hub.py)."""
    if not Path(path).is_dir():
        raise UserError(f"{key}: '{path}' is not a folder, nor a hub model name (org/name)")
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{key}: {path} has no config.json (not a Hugging Face checkpoint)")


def check_weights(path: str, key: str = "model_name_or_path") -> None:
    """The folder holds its weights: one file, or every shard its index names (an interrupted download has
    config and tokenizer but not these)."""
    folder = Path(path)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError):
                raise UserError(f"{key}: {index} is not a valid weights index; download the model again") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(
                    f"{key}: {path} lacks {len(missing)} of the {len(shards)} weight files its index names "
                    f"({missing[0]}, ...): an interrupted download? download the model again"
                )
            return
    raise UserError(
        f"{key}: {path} has config.json but no weights ({' or '.join(WEIGHT_FILES)}, or a sharded index): an "
        "interrupted download? download the model again, or give the folder that holds them"
    )


def model_folder(cfg: RunConfig, name: str | None = None, key: str = "model_name_or_path") -> str:
    """The local folder of a model key's value (model_name_or_path unless `name`), downloaded if it is a hub name."""
    from lf_dist.model.hub import local_model

    path = local_model(name or cfg.model.model_name_or_path, cfg.model, key)
    check_local(path, key)
    return path


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    model_args = cfg.model
    return AutoTokenizer.from_pretrained(
        model_folder(cfg),
        trust_remote_code=model_args.trust_remote_code,
        use_fast=model_args.use_fast_tokenizer,
        padding_side="right",
        cache_dir=model_args.cache_dir,
    )


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.train.bf16 or cfg.finetuning.pure_bf16:  # pure_bf16: the weights themselves are bf16 (LLaMA-Factory)
        return torch.bfloat16
    if cfg.train.fp16:
        return torch.float16
    return torch.float32


def attn_implementation(flash_attn: str) -> str | None:
    """transformers' attn_implementation for `flash_attn` (auto is resolved by the plan before loading)."""
    if flash_attn == "fa2":
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("flash_attn: fa2 needs the flash-attn package (pip install flash-attn); use sdpa or auto")
        return "flash_attention_2"
    if flash_attn == "varlen":
        from lf_dist.kernels.attention import register

        return register()
    return {"auto": None, "disabled": "eager", "sdpa": "sdpa"}[flash_attn]


def quantization_config(cfg: RunConfig):
    """bitsandbytes 4/8-bit loading (QLoRA): the quantized weights compute in the run's dtype."""
    from transformers import BitsAndBytesConfig

    model_args = cfg.model
    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = compute_dtype(cfg)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.quantization_type,
        bnb_4bit_use_double_quant=model_args.double_quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # a float storage, as FSDP-QLoRA needs
    )


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def load_model(
    cfg: RunConfig,
    tokenizer,
    head: Head = CAUSAL_LM,
    dtype: torch.dtype | None = None,
    meta: bool = False,
    path=None,
    device: torch.device | None = None,
    quantize: bool = True,
):
    """The base model with `head` (compute dtype unless `dtype`), the tokenizer's vocabulary and no KV cache;
    `path` overrides model_name_or_path.

    `meta=True` builds the architecture only (call under `torch.device("meta")`): sharded strategies shard it and
    read each rank's part of the weights afterwards, and the worker checks the fine-tuning setup on it before any
    data is read. With `quantization_bit` (and not on meta) the policy's base is loaded quantized by
    bitsandbytes straight onto `device` (a quantized model cannot be moved afterwards); `path` models (frozen
    references) load unquantized; `quantize=False` leaves that to the strategy (FSDP2's NF4).
    """
    from transformers import AutoConfig

    model_args = cfg.model
    policy = path in (None, model_args.model_name_or_path)
    path = model_folder(cfg, path, "model_name_or_path" if policy else "ref_model")
    kwargs = {"dtype": dtype or compute_dtype(cfg), "trust_remote_code": model_args.trust_remote_code}
    attn = attn_implementation(model_args.flash_attn)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    auto, head_config = head.auto(), head.config_values(tokenizer)
    if meta:
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir
        )
        for key, value in head_config.items():
            setattr(config, key, value)
        model = _from_config(auto, config, head, kwargs)
    else:
        if model_args.quantization_bit and policy and quantize:
            device = device or torch.device("cpu")
            kwargs.update(quantization_config=quantization_config(cfg), device_map={"": device})
        model = auto.from_pretrained(path, cache_dir=model_args.cache_dir, **head_config, **kwargs)
    if head.value_head:
        from lf_dist.model.heads import add_value_head

        add_value_head(model, kwargs["dtype"])
    model.config.use_cache = False  # training never uses the cache; packed rows need it off
    _apply_kernels(model, cfg)
    weight = model.get_input_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # built inside zero.Init: the parameter is a placeholder
    if len(tokenizer) > vocab:
        logger.info(f"resizing token embeddings {vocab} -> {len(tokenizer)} for added special tokens")
        # On meta there are no values to average (and the new rows come from rank 0's weights anyway).
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=not meta)
    return model


def _apply_kernels(model, cfg: RunConfig) -> None:
    """Liger's patches and torchao's float8 layers, as the plan chose them. Liger: only with CUDA and a supported
    family; a meta model too (instance patching allocates nothing), since sharded strategies train the model they
    built on the meta device. float8: the plan let fp8 through only where there are float8 tensor cores."""
    if cfg.model.enable_liger_kernel:
        from lf_dist.kernels import liger

        liger.apply(model)
    if cfg.train.fp8:
        from lf_dist.kernels import float8

        logger.info(f"fp8: {float8.apply(model, cfg.train.fp8_enable_fsdp_float8_all_gather)} linear layers in float8")


def _from_config(auto, config, head: Head, kwargs: dict):
    try:
        return auto.from_config(config, **kwargs)
    except ValueError as err:  # transformers names the architectures this Auto class knows
        raise UserError(
            f"model_name_or_path: a {config.model_type} model has no {head.name} head ({head.auto_class}); "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
