"""A DeepSpeed checkpoint resumed on another world size, through DeepSpeed's universal checkpoint.

ZeRO cuts the optimizer state (fp32 masters, Adam moments) into one partition per rank, so the engine's own
checkpoint loads only on the world size that wrote it. DeepSpeed's `ds_to_universal` rewrites those partitions
as one folder per parameter, which an engine of any world size loads with its `load_universal` setting. The
conversion is made once, inside checkpoint-N/ (`ds_universal/`), under a temporary name renamed only when it is
complete and checked: a conversion cut short is never trusted, and a later resume on yet another world size
reuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import shutil
from pathlib import Path

import torch

FOLDER = "ds_universal"  # inside checkpoint-N/, beside the engine's own tag folder


def saved_world(path: Path, world_file: str | None, tag: str) -> int | None:
    """The world size that wrote the checkpoint: recorded beside it, else one optimizer partition per rank."""
    recorded = Path(path) / world_file if world_file else None
    if recorded is not None and recorded.is_file():
        return int(recorded.read_text(encoding="utf-8"))
    return len(list((Path(path) / tag).glob("*optim_states.pt"))) or None


def partitioned(path: Path, tag: str) -> bool:
    """Whether ZeRO partitioned the optimizer state by rank (stage 0 saves it whole, loadable on any world size)."""
    return any((Path(path) / tag).glob("*zero_pp_rank_*optim_states.pt"))


def convert(path: Path, tag: str) -> bool:
    """Convert `path`/`tag` into `path`/FOLDER/`tag` unless that exists; whether it was converted now."""
    final = Path(path) / FOLDER
    if final.is_dir():
        return False  # renamed into place only when complete and checked
    tmp = Path(path) / f".tmp-{FOLDER}"
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted conversion left
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(Path(path) / tag),
        output_folder=str(tmp / tag),  # it writes `latest_universal` into the folder above this one
        num_extract_workers=1,  # in this process: no worker pool forked from a rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # a Hugging Face model carries no universal_checkpoint_info of its own
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # its progress prints and bars: the caller's notice says what happened
        _check(Path(path) / tag, tmp / tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)
    return True


def _check(saved: Path, converted: Path) -> None:
    """Each converted fp32 master must round to the weight the engine saved whole beside it (ZeRO-1/2 save every
    trainable weight whole; ZeRO-3 only partitions, which this skips): a conversion that put a slice in the wrong
    place is refused, never trained on."""
    for file in sorted(saved.glob("*model_states.pt")):
        module = torch.load(file, map_location="cpu", mmap=True, weights_only=False).get("module") or {}
        for name, weight in module.items():
            master = converted / "zero" / name / "fp32.pt"
            if not master.is_file():
                continue
            value = torch.load(master, map_location="cpu", weights_only=False)
            value = value["param"] if isinstance(value, dict) else value  # ZeRO-1/2 write a dict, ZeRO-3 the tensor
            if value.numel() == weight.numel() and not torch.equal(
                value.reshape(weight.shape).to(weight.dtype), weight
            ):
                raise ValueError(f"the converted {name} differs from the saved weights")


def link_round_robin(optimizer) -> None:
    """DeepSpeed (0.19.8) links each ZeRO-1/2 parameter to its slice of the fp32 partition as if the flat buffer held
    the parameters in model order; under `round_robin_gradients` it holds them reordered, and the exact offsets
    are passed only when alignment padding exists. The links serve only the universal checkpoint (the slice
    mappings a checkpoint records, the slices a universal load fills), so they are made again with the offsets."""
    from deepspeed.utils.mixed_precision_linkage import link_hp_params

    needed = (
        "round_robin_bit16_groups",
        "round_robin_bit16_offsets",
        "round_robin_bit16_padding",
        "bit16_groups_flat",
    )
    if not getattr(optimizer, "round_robin_gradients", False) or not all(hasattr(optimizer, a) for a in needed):
        return
    if "param_offsets" not in inspect.signature(link_hp_params).parameters:
        return  # an older DeepSpeed: the conversion check refuses what it gets wrong
    import torch.distributed as dist

    for i, params in enumerate(optimizer.bit16_groups):
        if any(optimizer.round_robin_bit16_padding[i]):
            continue  # DeepSpeed passed the offsets itself
        at = dict(zip(map(id, optimizer.round_robin_bit16_groups[i]), optimizer.round_robin_bit16_offsets[i]))
        group = optimizer.real_dp_process_group[i]
        size = optimizer.bit16_groups_flat[i].numel() // dist.get_world_size(group=group)
        link_hp_params(
            lp_param_list=params,
            flat_hp_partition=optimizer.single_partition_of_fp32_groups[i],
            gradient_dict=optimizer.averaged_gradients,
            offload_gradient_dict=optimizer.offload_gradient_dict,
            use_offload=optimizer.cpu_offload,
            param_group_index=i,
            partition_start=dist.get_rank(group=group) * size,
            partition_size=size,
            dp_group=group,
            param_offsets=[at[id(p)] for p in params],
        )
    optimizer._param_slice_mappings = optimizer._create_param_mapping()
    if optimizer.cpu_offload:
        optimizer._create_optimizer_mapping()


def repair_stage3_load(optimizer, folder: Path, tag: str) -> None:
    """Two things ZeRO-3's universal load (DeepSpeed 0.19.8) gets wrong: every param group takes the first saved
    group's settings (its weight_decay among them), and every fp32 sub-group partition gets one shared Adam `step`
    tensor, which each sub-group's update then advances again. Each group gets its own saved settings back, each
    partition its own step."""
    saved = torch.load(Path(folder) / tag / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or []
    if len(groups) == len(optimizer.param_groups):
        for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
