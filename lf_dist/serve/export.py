"""`lf-dist export`: adapters merged into the base (or a sharded checkpoint made whole), written as a Hugging Face
model in shards of at most `export_size` GB, with the tokenizer and the chat template it was trained with.

The folder is written under a temporary name and renamed when complete: an interrupted export leaves the
previous one (or nothing) behind, never half a model.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import torch

from lf_dist.config import RunConfig
from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.serve.weights import load_weights, resolve

logger = get_logger(__name__)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check_export_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"export_dir: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"export_dir: {out} is not empty and holds no model (an earlier export); choose another")


def tokenizer_source(cfg: RunConfig) -> str:
    """The tokenizer the model was trained with: saved with its adapter or checkpoint, else the base's."""
    sources = resolve(cfg)
    for folder in [*([sources.sharded] if sources.sharded else []), *reversed(sources.adapters)]:
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return sources.base


def load_tokenizer_and_template(cfg: RunConfig):
    """Tokenizer (from the trained folder), the run's template, and the tokenizer fixed as training fixed it."""
    from transformers import AutoTokenizer

    from lf_dist.data.templates import fix_tokenizer, get_template

    model_args = cfg.model
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source(cfg), trust_remote_code=model_args.trust_remote_code, use_fast=model_args.use_fast_tokenizer
    )
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    return tokenizer, template


def output_dtype(cfg: RunConfig, base: str) -> torch.dtype:
    """infer_dtype, or (auto) the dtype the base model was published in."""
    if cfg.generation.infer_dtype != "auto":
        return DTYPES[cfg.generation.infer_dtype]
    config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)


def export(cfg: RunConfig) -> Path:
    from transformers import PreTrainedModel

    export_args = cfg.export
    out = Path(export_args.export_dir)
    _check_export_dir(out)
    if (
        export_args.export_legacy_format
        and "safe_serialization" not in inspect.signature(PreTrainedModel.save_pretrained).parameters
    ):
        raise UserError("export_legacy_format: the installed transformers writes only safetensors; remove the key")
    sources = resolve(cfg)
    device = torch.device("cuda" if export_args.export_device == "auto" and torch.cuda.is_available() else "cpu")
    tokenizer, _ = load_tokenizer_and_template(cfg)
    model, _ = load_weights(cfg, tokenizer, output_dtype(cfg, sources.base), device, merge=True)
    model.config.use_cache = True  # an exported model is for generation
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kwargs = {"safe_serialization": False} if export_args.export_legacy_format else {}
    model.save_pretrained(tmp, max_shard_size=f"{max(int(export_args.export_size * 1000), 1)}MB", **kwargs)
    # as LLaMA-Factory exports it: batched generation pads on the left (transformers 5 saves what init was given)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".bin"))
    logger.info(
        f"exported {sum(p.numel() for p in model.parameters()):,} parameters ({size / 2**30:.2f} GiB) "
        f"to {out.resolve()}"
    )
    return out
