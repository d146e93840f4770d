"""The model to serve or export: a base checkpoint, its adapters, or a checkpoint-N of any lf-dist backend.

Sources, found by what a folder holds:
- a Hugging Face model folder (config.json + weights): the base, or a full fine-tune (single-process
  checkpoints are such folders);
- a peft adapter folder (adapter_config.json): LoRA weights on top of the base, merged or kept;
- an lf-dist checkpoint of a sharded run: DCP shards (ddp, fsdp2) or a DeepSpeed engine checkpoint. These
  carry the model's config.json, the adapter_config.json of LoRA runs and the run's config
  (`lf_dist_run.json`); their trained tensors are read offline, no process group needed, and laid over the
  base the run started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lf_dist import startup
from lf_dist.config import RunConfig
from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.model.heads import CAUSAL_LM, SEQUENCE_SCORE
from lf_dist.model.hub import local_model
from lf_dist.model.loader import check_local, check_weights, load_model
from lf_dist.parallel import formats
from lf_dist.parallel.formats import RUN_FILE

logger = get_logger(__name__)


def sharded_kind(path: Path) -> str | None:
    """The format's name ('dcp', 'deepspeed') of a checkpoint of a sharded run, None for anything else."""
    found = formats.sharded(path)
    return found.name if found else None


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


@dataclass
class Sources:
    base: str  # a Hugging Face model folder
    adapters: list[Path]  # peft adapter folders, applied in order
    sharded: Path | None = None  # a DCP / DeepSpeed checkpoint laid over base (+ its own adapter config)


def resolve(cfg: RunConfig) -> Sources:
    """Where the weights come from, checked before anything is loaded."""
    model_args = cfg.model
    model_path = Path(local_model(model_args.model_name_or_path, model_args))
    names = [a.strip() for a in (model_args.adapter_name_or_path or "").split(",") if a.strip()]
    adapters = [Path(local_model(a, model_args, "adapter_name_or_path")) for a in names]
    sharded = None
    if model_path.is_dir() and sharded_kind(model_path):
        sharded, base = model_path, _recorded_base(model_path, model_args)
    else:
        check_local(str(model_path))
        base = str(model_path)
    check_weights(base)
    for adapter in adapters:
        if not adapter.is_dir():
            raise UserError(f"adapter_name_or_path: {adapter} is not a directory")
        if sharded_kind(adapter):
            if sharded is not None or len(adapters) > 1:
                raise UserError("adapter_name_or_path: a sharded lf-dist checkpoint must be the only adapter")
            sharded = adapter
        elif not is_adapter(adapter):
            raise UserError(f"adapter_name_or_path: {adapter} has no adapter_config.json (not a peft adapter)")
    return Sources(base, [a for a in adapters if a != sharded], sharded)


def _recorded_base(ckpt: Path, model_args) -> str:
    """The base model of the run that wrote `ckpt` (its own frozen weights are not in the shards)."""
    run_file = ckpt / RUN_FILE
    if not run_file.is_file():
        raise UserError(
            f"model_name_or_path: {ckpt} has no {RUN_FILE}; give the base as model_name_or_path and "
            "the checkpoint as adapter_name_or_path"
        )
    base = local_model(json.loads(run_file.read_text(encoding="utf-8"))["model_name_or_path"], model_args)
    if not (Path(base) / "config.json").is_file():
        raise UserError(f"model_name_or_path: the base model of {ckpt} ({base}) is not there any more")
    return base


def _head_of(sources: Sources):
    configs = [a / "adapter_config.json" for a in sources.adapters]
    if sources.sharded is not None and is_adapter(sources.sharded):
        configs.append(sources.sharded / "adapter_config.json")
    tasks = {json.loads(c.read_text(encoding="utf-8")).get("task_type") for c in configs}
    return SEQUENCE_SCORE if "SEQ_CLS" in tasks else CAUSAL_LM


def load_weights(cfg: RunConfig, tokenizer, dtype: torch.dtype, device: torch.device, merge: bool | None):
    """The model from `cfg`'s sources on `device`; adapters merged (`merge` True; None: unless the base is
    quantized), else the last kept as peft. Returns (model, head)."""
    from peft import PeftModel

    sources = resolve(cfg)
    head = _head_of(sources)
    quantized = bool(cfg.model.quantization_bit) or _is_prequantized(sources.base)
    if merge is None:
        merge = not quantized
    if merge and quantized and (sources.adapters or sources.sharded):
        raise UserError(
            "quantization_bit: adapters cannot be merged into a quantized base; export from the unquantized model"
        )
    run_cfg = _loading_config(cfg, sources.base)
    model = load_model(run_cfg, tokenizer, head, dtype=dtype, device=device)
    if not quantized:
        model = model.to(device)
    for i, adapter in enumerate(sources.adapters):
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        last = i == len(sources.adapters) - 1 and sources.sharded is None
        if merge or not last:
            model = model.merge_and_unload()
        logger.info(f"adapter {adapter} {'merged' if merge or not last else 'loaded'}")
    if sources.sharded is not None:
        model = _lay_over(model, sources.sharded, device)
        if merge and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    model.requires_grad_(False)
    startup.settle()  # loaded: a server's own allocations are collected as usual from here on
    return model.eval(), head


def _loading_config(cfg: RunConfig, base: str) -> RunConfig:
    """The config as load_model reads it: the base folder, sdpa attention (generation uses a KV cache, and no
    packed rows), no Liger patches."""
    attention = "sdpa" if cfg.model.flash_attn in ("auto", "varlen") else cfg.model.flash_attn
    return cfg.replace(
        model={
            "model_name_or_path": base,
            "adapter_name_or_path": None,
            "enable_liger_kernel": False,
            "flash_attn": attention,
        }
    )


def _is_prequantized(base: str) -> bool:
    config = Path(base) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))


def _lay_over(model, ckpt: Path, device: torch.device):
    """The trained tensors of a sharded checkpoint over `model` (wrapped with the checkpoint's adapter config
    first when the run trained LoRA)."""
    if is_adapter(ckpt):
        from peft import PeftConfig, get_peft_model

        model = get_peft_model(model, PeftConfig.from_pretrained(str(ckpt)))
    state = _read_sharded(ckpt, model)  # names checked against the model's
    own = model.state_dict()
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(
                f"{ckpt}: {key} has shape {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
            )
        with torch.no_grad():
            own[key].copy_(value.to(device))
    logger.info(f"{len(state)} trained tensors read from {ckpt} ({sharded_kind(ckpt)})")
    return model


def _require_known(ckpt: Path, names, own: dict) -> None:
    unknown = [n for n in names if n not in own]
    if unknown:
        raise UserError(
            f"{ckpt}: the checkpoint does not match the model ({len(unknown)} unknown tensors, e.g. "
            f"{unknown[0]}); is model_name_or_path the base it was trained from?"
        )


def _read_sharded(ckpt: Path, model) -> dict:
    own = model.state_dict()
    state = formats.read_trained(ckpt, own)
    _require_known(ckpt, state, own)
    return state
