"""The plan's kernel choices: attention, padding-free batches, cross-entropy, Liger, compile, the optimizer.

Each choice comes with its reason; a key the user set is kept as set. What each kernel does lives in
`lf_dist/kernels/`; here is only when it applies.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from lf_dist.config import RunConfig
from lf_dist.kernels import liger
from lf_dist.parallel.registry import get_backend
from lf_dist.planner.profiles import HardwareProfile

SEPARATING = ("varlen", "fa2")  # attention that keeps the examples of a row apart without a mask


@dataclass
class Kernels:
    attention: str = "auto"  # a flash_attn value; auto: transformers' default for the model
    padding_free: bool = False
    cross_entropy: str = "chunked"  # chunked | liger | none (a score head)
    liger: bool = False
    torch_compile: bool = False
    optim: str = "adamw_torch"
    reasons: list = field(default_factory=list)


def _attention(cfg: RunConfig, hw: HardwareProfile, model_config) -> tuple[str, str]:
    if cfg.model.flash_attn != "auto":
        return cfg.model.flash_attn, f"attention {cfg.model.flash_attn}: as the config says"
    softcap = getattr(model_config, "attn_logit_softcapping", None)
    if softcap or getattr(model_config, "model_type", "") == "gpt_oss":
        return "auto", "attention: transformers' default (the model's soft-capping or sinks need its own kernel)"
    if hw.on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "fa2", "attention fa2: flash-attn is installed (varlen over the examples of a row)"
    where = "torch's varlen kernel" if hw.on_gpu else "one causal sdpa call per example"
    return "varlen", f"attention varlen: {where}, no mask for rows that hold several examples"


def _padding_free(cfg: RunConfig, attention: str, packs: bool) -> tuple[bool, str]:
    data_args = cfg.data
    if data_args.padding_free is not None:
        return (
            data_args.padding_free,
            f"padding-free batches {'on' if data_args.padding_free else 'off'}: as the config says",
        )
    if data_args.packing and packs:
        return False, "padding-free batches off: rows are packed already"
    if attention not in SEPARATING:
        return False, f"padding-free batches off: attention {attention} would need a block mask to separate them"
    return True, "padding-free batches: the examples of a micro-batch end to end in one row, no padding"


def _liger(cfg: RunConfig, hw: HardwareProfile, model_type: str) -> tuple[bool, str | None]:
    asked = cfg.model.enable_liger_kernel
    if asked is False:
        return False, "liger off: as the config says"
    found = liger.version()
    why_not = None
    if not hw.on_gpu:
        why_not = "no CUDA (Triton kernels); the chunked cross-entropy and torch kernels run instead"
    elif not liger.usable_version(found):
        why_not = f"liger-kernel>=0.8.2 is not installed (found {found or 'none'}); pip install lf-dist[liger]"
    elif not liger.supports(model_type):
        why_not = f"no Liger patches for {model_type} (has: {', '.join(liger.FAMILIES)})"
    if why_not:
        return False, (f"liger off: {why_not}" if asked or hw.on_gpu else None)
    return True, f"liger on: RMSNorm, RoPE, SwiGLU and fused linear cross-entropy for {model_type}" + (
        "" if asked else " (the default on CUDA)"
    )


def choose(cfg: RunConfig, hw: HardwareProfile, model_config, stage, strategy: str) -> Kernels:
    """The kernels of this run (`strategy` as the plan chose it)."""
    k = Kernels()
    k.attention, why = _attention(cfg, hw, model_config)
    k.reasons.append(why)
    if stage.generates:  # completions are scored in right-padded rows, prompt then completion
        k.padding_free, why = False, "padding-free batches off: a rollout's rows are prompt + completion, right-padded"
    else:
        k.padding_free, why = _padding_free(cfg, k.attention, stage.data.packs)
    k.reasons.append(why)
    k.liger, why = _liger(cfg, hw, getattr(model_config, "model_type", ""))
    if why:
        k.reasons.append(why)
    if not stage.head.scores_vocabulary:
        k.cross_entropy = "none"
    elif stage.generates:
        k.cross_entropy = "none"
        k.reasons.append(
            "log-probs: full fp32 logits at the completion's positions (the sampling temperature and the entropy "
            "need them)"
        )
    else:
        k.cross_entropy = "liger" if k.liger else "chunked"
        k.reasons.append(
            f"cross-entropy {k.cross_entropy}: label positions only, no [tokens × vocabulary] logits"
            + ("" if k.liger else " (chunks of ~128 MiB of logits)")
        )
    k.torch_compile = cfg.train.torch_compile
    if k.torch_compile:
        k.reasons.append("torch.compile: each decoder block, after parallelism is applied")
    k.optim = cfg.train.optim
    if "optim" not in cfg.given and get_backend(strategy).fused_optimizer:
        k.optim = "adamw_torch_fused"
        k.reasons.append("optimizer: torch's fused AdamW (one kernel over all parameters)")
    return k


def lean_lora(cfg: RunConfig, method: str, bits: int | None) -> tuple[bool, str | None]:
    """Whether LoRA layers run `kernels/lora.py`'s forward; decided once the method (lora, qlora) is known."""
    finetuning_args = cfg.finetuning
    if method != "lora":
        return False, None
    if finetuning_args.lean_lora is False:
        return False, "LoRA forward peft: as the config says"
    if (
        bits or finetuning_args.use_dora
    ):  # peft's own layer classes (bitsandbytes) or a variant: the lean path does not apply
        return False, "LoRA forward peft: " + (
            "DoRA layers" if finetuning_args.use_dora else "quantized base layers"
        ) + " keep it"
    why = "as the config says" if finetuning_args.lean_lora else "the update scaled at rank r and added in place"
    return True, f"LoRA forward lean: {why} (two full-width passes fewer per layer)"
