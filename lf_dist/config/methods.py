"""LLaMA-Factory's optional training methods: which ones a config turns on, and the rules between them.

A method is an optimizer from its own library (GaLore, APOLLO, BAdam, Adam-mini, Muon), an adapter variant (OFT,
PiSSA, LoRA+), a token loss of sft (DFT, ASFT, EAFT), or a precision (fp8, pure_bf16). `active_methods` names the
ones a config uses; the rules that need no backend are checked here (`check_methods`, called by `validate`), and
each backend says which methods it runs (`parallel/registry.py`), so a pair it cannot run is refused in one line
before anything is launched. The rules mirror LLaMA-Factory's (hparams/finetuning_args.py and parser.py).
"""

from __future__ import annotations

import importlib

from lf_dist.config.schema import ADAPTER_TYPES, RunConfig
from lf_dist.errors import UserError

GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
APOLLO_PROJ = ("svd", "random")
APOLLO_PROJ_TYPES = ("std", "right", "left")
APOLLO_SCALE_TYPES = ("channel", "tensor")
BADAM_MODES = ("layer", "ratio")
BADAM_SWITCH_MODES = ("ascending", "descending", "random", "fixed")
BADAM_MASK_MODES = ("adjacent", "scatter")
FP8_BACKENDS = ("auto", "torchao")
# methods that step each parameter in its own backward hook: one process only, no gradient accumulation
LAYERWISE = ("galore_layerwise", "apollo_layerwise")
# methods run on one device only: LLaMA-Factory's rule for these three; BAdam's layer mode, which it also runs
# under ZeRO-3, is one process here (badam's ZeRO-3 path fails with this DeepSpeed: FINDINGS)
ONE_DEVICE = (*LAYERWISE, "badam_ratio", "badam_layer")


def active_methods(cfg: RunConfig) -> dict[str, str]:
    """The methods `cfg` turns on: method id → the key that turns it on (as messages name it)."""
    f, t = cfg.finetuning, cfg.train
    found = {}
    if f.use_galore:
        found["galore_layerwise" if f.galore_layerwise else "galore"] = "use_galore"
    if f.use_apollo:
        found["apollo_layerwise" if f.apollo_layerwise else "apollo"] = "use_apollo"
    if f.use_badam:
        found[f"badam_{f.badam_mode}"] = f"use_badam (badam_mode {f.badam_mode})"
    if f.use_adam_mini:
        found["adam_mini"] = "use_adam_mini"
    if f.use_muon:
        found["muon"] = "use_muon"
    if f.loraplus_lr_ratio is not None:
        found["loraplus"] = "loraplus_lr_ratio"
    if f.finetuning_type == "oft":
        found["oft"] = "finetuning_type oft"
    if f.pissa_init:
        found["pissa"] = "pissa_init"
    for key in ("use_dft_loss", "use_asft_loss", "use_eaft_loss"):
        if getattr(f, key):
            found[key[4:-5]] = key
    if t.fp8:
        found["fp8"] = "fp8"
    if f.pure_bf16:
        found["pure_bf16"] = "pure_bf16"
    if t.do_predict:
        found["predict"] = "do_predict"
    if cfg.model.use_reentrant_gc:
        found["reentrant_gc"] = "use_reentrant_gc"
    return found


def optimizer_methods(cfg: RunConfig) -> list[str]:
    """The optimizer methods a config turns on (at most one is allowed)."""
    return [m for m in active_methods(cfg) if m.split("_")[0] in ("galore", "apollo", "badam", "adam", "muon")]


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_methods(cfg: RunConfig) -> None:
    """The method rules that hold on every backend (one UserError line each)."""
    f, t = cfg.finetuning, cfg.train
    _choice("galore_proj_type", f.galore_proj_type, GALORE_PROJ_TYPES)
    _choice("apollo_proj", f.apollo_proj, APOLLO_PROJ)
    _choice("apollo_proj_type", f.apollo_proj_type, APOLLO_PROJ_TYPES)
    _choice("apollo_scale_type", f.apollo_scale_type, APOLLO_SCALE_TYPES)
    _choice("badam_mode", f.badam_mode, BADAM_MODES)
    _choice("badam_mask_mode", f.badam_mask_mode, BADAM_MASK_MODES)
    if f.badam_switch_mode is not None:
        _choice("badam_switch_mode", f.badam_switch_mode, BADAM_SWITCH_MODES)
    _choice("fp8_backend", t.fp8_backend, FP8_BACKENDS)
    optimizers = optimizer_methods(cfg)
    methods = active_methods(cfg)
    if len(optimizers) > 1:
        raise UserError(f"{methods[optimizers[0]]} and {methods[optimizers[1]]}: choose one optimizer")
    full_weights = optimizers and optimizers[0].split("_")[0] in ("galore", "apollo", "badam")
    if full_weights and f.finetuning_type in ADAPTER_TYPES:
        raise UserError(
            f"{methods[optimizers[0]]}: GaLore, APOLLO and BAdam update the weights themselves, not "
            f"{f.finetuning_type} adapters; use finetuning_type full or freeze"
        )
    if any(m in methods for m in LAYERWISE) and t.gradient_accumulation_steps != 1:
        raise UserError(
            "galore_layerwise / apollo_layerwise: each parameter steps in its own backward hook, so "
            f"gradient_accumulation_steps must be 1 (got {t.gradient_accumulation_steps})"
        )
    if f.badam_mode == "ratio" and f.use_badam and f.badam_update_ratio <= 1e-6:
        raise UserError(f"badam_update_ratio: must be > 0, got {f.badam_update_ratio}")
    _check_adapters(cfg)
    _check_losses_and_precision(cfg)


def _check_adapters(cfg: RunConfig) -> None:
    f = cfg.finetuning
    if f.use_llama_pro and f.finetuning_type not in ("freeze", "lora"):
        raise UserError(f"use_llama_pro: only for finetuning_type freeze or lora, not {f.finetuning_type}")
    if f.loraplus_lr_ratio is not None and f.finetuning_type != "lora":
        raise UserError(f"loraplus_lr_ratio: only for finetuning_type lora, not {f.finetuning_type}")
    if f.pissa_init and f.finetuning_type != "lora":
        raise UserError(f"pissa_init: only for finetuning_type lora, not {f.finetuning_type}")
    if f.pissa_init and cfg.model.quantization_bit is not None:
        raise UserError("pissa_init: PiSSA decomposes full-precision weights; it cannot start from a quantized base")
    if f.pissa_init and cfg.model.adapter_name_or_path:
        raise UserError("pissa_init: initialises a new adapter; drop it to go on training adapter_name_or_path")
    if f.finetuning_type == "oft" and f.oft_rank == 0 and f.oft_block_size == 0:
        raise UserError("oft_rank / oft_block_size: set one of them (peft's OFT needs a rank or a block size)")
    if cfg.model.mixture_of_depths is not None:
        raise UserError(f"mixture_of_depths: {_mod_unavailable()}")


def _mod_unavailable() -> str:
    """Why mixture-of-depths cannot run here: the `mixture-of-depth` package is missing, or fails to import."""
    if importlib.util.find_spec("MoD") is None:
        # measured: mixture-of-depth 1.2.0 (its latest) imports transformers 4's TRANSFORMERS_CACHE at import time
        return (
            "needs the mixture-of-depth package, whose latest release (1.2.0) does not import with transformers 5 "
            "(it reads transformers 4's TRANSFORMERS_CACHE), so no architecture can be converted; remove the key"
        )
    try:
        importlib.import_module("MoD")
    except ImportError as err:
        return (
            f"the mixture-of-depth package does not import with this transformers ({err}); it supports no "
            "architecture here, remove the key"
        )
    return (
        "the mixture-of-depth package wraps decoder layers in transformers 4's calling convention; it supports no "
        "architecture of this transformers, remove the key"
    )


def _check_losses_and_precision(cfg: RunConfig) -> None:
    f, t = cfg.finetuning, cfg.train
    losses = [k for k in ("use_dft_loss", "use_asft_loss", "use_eaft_loss") if getattr(f, k)]
    if len(losses) > 1:
        raise UserError(f"{losses[0]} and {losses[1]}: choose one token loss")
    if f.use_asft_loss and f.asft_alpha < 0:
        raise UserError(f"asft_alpha: must be >= 0, got {f.asft_alpha}")
    if f.pure_bf16 and t.fp16:
        raise UserError("pure_bf16 and fp16: choose one")
    if t.fp8_enable_fsdp_float8_all_gather and not t.fp8:
        # LLaMA-Factory turns fp8 on here (with a warning); a config that says one and not the other is refused
        raise UserError("fp8_enable_fsdp_float8_all_gather: needs fp8: true")
    if t.fp8 and cfg.model.quantization_bit is not None:
        raise UserError("fp8: float8 training is not compatible with quantization_bit; drop one of them")
    if t.do_predict and not t.predict_with_generate:
        raise UserError("do_predict: set predict_with_generate: true to generate and save the predictions")
    if t.predict_with_generate and not t.do_predict:
        raise UserError("predict_with_generate: only with do_predict (evaluation during training scores the loss)")
    if t.do_predict and not cfg.data.eval_dataset and not cfg.data.val_size:
        raise UserError("do_predict: needs eval_dataset (the examples to generate answers for)")


def distributed_refusal(cfg: RunConfig, world: int) -> str | None:
    """A method LLaMA-Factory runs on one device only, asked of `world` > 1 ranks."""
    if world <= 1:
        return None
    methods = active_methods(cfg)
    for method in ONE_DEVICE:
        if method in methods:
            how = "each parameter steps in its own backward hook" if method in LAYERWISE else "BAdam's block updates"
            return f"{methods[method]}: runs on one process ({how}), but {world} ranks were launched"
    return None
