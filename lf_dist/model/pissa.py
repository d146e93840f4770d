"""PiSSA (peft's `init_lora_weights="pissa"`) and LLaMA-Factory's conversion of a trained PiSSA adapter into a plain
LoRA adapter for the original base (`pissa_convert`).

PiSSA moves the top singular directions of each target weight into the adapter: the base keeps the residual
W_res = W - B0 A0, so the trained adapter (A, B) only fits that residual base. As LLaMA-Factory's
PissaConvertCallback does, the initial adapter is saved before training (`output_dir/pissa_init`) and, once the
final adapter is written, `pissa_backup` (the trained adapter, loadable without re-decomposing) and
`pissa_converted`: ΔW = B A - B0 A0 = [B | -B0] [A ; A0], a LoRA adapter of twice the rank for the original W.
The conversion is peft's (`LoraModel.subtract_mutated_init` and the config changes of `save_pretrained`'s
`path_initial_model_for_weight_conversion`) done on the saved files, so every backend's final adapter (gathered
from shards or not) converts the same way and no model is loaded for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lf_dist.log import get_logger

logger = get_logger(__name__)

INIT_DIR, BACKUP_DIR, CONVERTED_DIR = "pissa_init", "pissa_backup", "pissa_converted"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def init_weights(finetuning_args) -> bool | str:
    """peft's `init_lora_weights` for the config (LLaMA-Factory's: pissa_iter -1 is the full SVD)."""
    if not finetuning_args.pissa_init:
        return True
    if finetuning_args.pissa_iter == -1:
        return "pissa"
    return f"pissa_niter_{finetuning_args.pissa_iter}"


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_initial(model, cfg) -> None:
    """The freshly initialised PiSSA adapter in output_dir/pissa_init, by the process that holds it for real (a
    meta skeleton holds nothing; the rank that builds the model whole writes it)."""
    if not (cfg.finetuning.pissa_init and cfg.finetuning.pissa_convert and cfg.train.output_dir):
        return
    if any(p.is_meta for p in model.parameters()) or not _is_main():
        return
    folder = Path(cfg.train.output_dir) / INIT_DIR
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # loading it must not decompose the base again
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init
    logger.info(f"initial PiSSA adapter saved to {folder}")


def convert_saved(path: Path) -> None:
    """After the final adapter is written in `path`: pissa_backup and pissa_converted beside it (rank 0 only)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    init_dir = path / INIT_DIR
    if not (init_dir / WEIGHTS).is_file():
        logger.info(f"warning: pissa_convert: no initial adapter in {init_dir}; the PiSSA adapter is kept as is")
        return
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    trained, initial = load_file(path / WEIGHTS), load_file(init_dir / WEIGHTS)
    backup = path / BACKUP_DIR
    backup.mkdir(exist_ok=True)
    shutil.copyfile(path / WEIGHTS, backup / WEIGHTS)
    _write_config(backup / CONFIG, {**config, "init_lora_weights": True})
    converted = path / CONVERTED_DIR
    converted.mkdir(exist_ok=True)
    save_file(subtract_initial(trained, initial), str(converted / WEIGHTS), metadata={"format": "pt"})
    _write_config(converted / CONFIG, converted_config(config))
    logger.info(f"PiSSA adapter converted to a LoRA adapter for the original base: {converted}")


def subtract_initial(trained: dict, initial: dict) -> dict:
    """ΔW = B A - B0 A0 as one LoRA of twice the rank: A' = [A ; A0], B' = [B | -B0] (peft's
    subtract_mutated_init). Tensors that are not LoRA factors (modules_to_save copies) are kept: they replace
    the original module whole, which peft's conversion drops."""
    out = {}
    for name, value in trained.items():
        if "lora_A" in name:
            out[name] = torch.cat([value, initial[name].to(value.dtype)], dim=0).contiguous()
        elif "lora_B" in name:
            out[name] = torch.cat([value, -initial[name].to(value.dtype)], dim=1).contiguous()
        else:
            out[name] = value.contiguous()
    return out


def converted_config(config: dict) -> dict:
    """The adapter config of the converted LoRA: plain init, rank doubled, the scaling alpha / r (or alpha /
    sqrt(r) with rsLoRA) unchanged."""
    out = {**config, "init_lora_weights": True, "r": config["r"] * 2}
    out["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if out.get(key):
            out[key] = {k: 2 * v for k, v in out[key].items()}
    return out


def _write_config(file: Path, config: dict) -> None:
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
