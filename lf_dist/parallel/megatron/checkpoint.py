"""strategy megatron's checkpoints and export.

`checkpoint-N/torch_dist/` is megatron-core's dist_checkpointing save of the trained weights and the optimizer:
each tensor is stored with its global shape and every rank writes its own shards, so a run resumes at another
tensor- or pipeline-parallel size (megatron-core reshards on load). LoRA saves its adapters only; the frozen base
comes from model_name_or_path again. The scheduler's state, the tokenizer and the model's config sit beside it.

The final model is gathered to global rank 0 in Hugging Face names and written as safetensors shards with the
config and tokenizer (full fine-tuning), or as a peft adapter that `lf-dist export` merges.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lf_dist.errors import RunStopped
from lf_dist.parallel.formats import MEGATRON


def _modules(model) -> list:
    return [chunk.module for chunk in model]  # inside megatron-core's DDP


def _model_state(model) -> dict:
    """Each chunk's sharded state dict, its frozen weights left out (LoRA's base is not trained)."""
    state = {}
    for i, chunk in enumerate(model):
        frozen = {name for name, p in chunk.module.named_parameters() if not p.requires_grad}
        sharded = chunk.sharded_state_dict()
        state[f"model{i}"] = {k: v for k, v in sharded.items() if k not in frozen}
    return state


def save(strategy, model, optimizer, scheduler, tokenizer, path: Path, save_only_model: bool) -> None:
    from megatron.core import dist_checkpointing

    path = Path(path)
    target = path / MEGATRON.marker
    state = _model_state(model)
    if not save_only_model:
        state["optimizer"] = optimizer.inner.sharded_state_dict(dict(state))  # finds each state's parameter
    if strategy.is_main:
        target.mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    dist_checkpointing.save(state, str(target))
    if strategy.is_main:
        tokenizer.save_pretrained(path)
        strategy.hf_config.save_pretrained(path)
        if not save_only_model:
            torch.save(scheduler.state_dict(), path / "scheduler.pt")


def load(strategy, model, optimizer, scheduler, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = _model_state(model)
    state["optimizer"] = optimizer.inner.sharded_state_dict(dict(state), is_loading=True)
    loaded = dist_checkpointing.load(state, str(path / MEGATRON.marker))
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(loaded[f"model{i}"], strict=False)  # the frozen base was not saved
    optimizer.inner.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))


def export(strategy, model, tokenizer, path: Path) -> None:
    """The final model (or adapter) in Hugging Face format, written by global rank 0; every rank gathers."""
    path = Path(path)
    if strategy.cfg.finetuning.finetuning_type == "lora":
        from lf_dist.parallel.megatron.lora_peft import gather_peft_adapter

        state = gather_peft_adapter(_modules(model), strategy.hf_config)
        write = _write_adapter
    else:
        from lf_dist.parallel.megatron.weights import gather_hf_state_dict

        state = gather_hf_state_dict(_modules(model), strategy.hf_config)
        write = _write_model
    error = None
    if strategy.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            write(strategy, state, path)
            tokenizer.save_pretrained(path)
        except OSError as err:
            error = err
    if strategy.all_reduce_sum(1 if error else 0):
        raise RunStopped(f"could not write the final model to {path}: {error or 'failed on rank 0'}")


def _write_model(strategy, state: dict, path: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    from lf_dist.model.loader import model_folder

    state = {k: v.detach().clone() for k, v in state.items()}  # views of fused tensors share storage
    save_torch_state_dict(state, path, max_shard_size=strategy.cfg.train.save_shard_size)
    strategy.hf_config.save_pretrained(path)
    generation = Path(model_folder(strategy.cfg)) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, path / "generation_config.json")


def _write_adapter(strategy, state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    from lf_dist.parallel.megatron.lora_peft import adapter_config

    config = adapter_config(strategy.hf_config, *strategy.lora)
    config.base_model_name_or_path = strategy.cfg.model.model_name_or_path
    config.save_pretrained(path)
    save_file({k: v.detach().clone() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
