"""Checkpoint formats: what a checkpoint-N/ folder holds for each backend, how it is recognised, and how its
trained tensors are read offline.

The strategies write these formats and refuse what they cannot load; `train/checkpoint.py` refuses a checkpoint
the run's backend cannot resume before anything is written (and records the run's config in each checkpoint);
`serve/weights.py` reads the trained tensors of a sharded checkpoint without a process group (export, chat, api).
A backend's strategy names its format; nothing else knows a layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lf_dist.errors import UserError

RUN_FILE = "lf_dist_run.json"  # the config of the run that wrote a checkpoint (resume checks, export's base)


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    marker: str  # the file or folder inside checkpoint-N/ that identifies the format
    written_by: str  # who writes it, for messages
    reshards: bool  # resumable on another world size
    offline: bool  # its trained tensors are read by `read_trained` (a sharded format)
    # the file recording the world size that wrote it; a format that cannot reshard is refused on another
    world_file: str | None = None


# A single-process checkpoint is a loadable Hugging Face folder plus the optimizer's state.
HF = CheckpointFormat("hf", "optimizer.pt", "a single-process run", reshards=False, offline=False)
# torch.distributed.checkpoint shards: any world size, and ddp <-> fsdp2.
DCP = CheckpointFormat("dcp", "dcp", "a distributed run (DCP shards of ddp / fsdp2)", reshards=True, offline=True)
# A DeepSpeed engine checkpoint (its tag folder). ZeRO's partitions are cut for the world size that wrote it (recorded
# in world_file): on another, the strategy resumes it through DeepSpeed's universal checkpoint (ds_universal.py).
DEEPSPEED = CheckpointFormat(
    "deepspeed", "ds", "DeepSpeed", reshards=True, offline=True, world_file="ds_world_size.txt"
)
# megatron-core's torch_dist checkpoint (dist_checkpointing): any tensor / pipeline / data-parallel layout.
MEGATRON = CheckpointFormat(
    "megatron", "torch_dist", "a megatron run (megatron-core's torch_dist)", reshards=True, offline=False
)
FORMATS = (DCP, DEEPSPEED, MEGATRON, HF)


def detect(path: Path) -> CheckpointFormat | None:
    """The format of a checkpoint folder, None for anything else (a plain Hugging Face model, an adapter)."""
    return next((f for f in FORMATS if (Path(path) / f.marker).exists()), None)


def sharded(path: Path) -> CheckpointFormat | None:
    """The format of a sharded lf-dist checkpoint (one `read_trained` reads), None for anything else."""
    found = detect(path) if Path(path).is_dir() else None
    return found if found is not None and found.offline else None


def record_world(path: Path, fmt: CheckpointFormat, world_size: int) -> None:
    if fmt.world_file:
        (Path(path) / fmt.world_file).write_text(str(world_size), encoding="utf-8")


def check_resumable(path: Path, fmt: CheckpointFormat, world_size: int, backend: str) -> None:
    """Refuse, in one line, a checkpoint that a run of `backend` (writing `fmt`) on `world_size` ranks cannot
    resume; reads only marker files. A resharding format goes on, whatever world size wrote it."""
    path, found = Path(path), detect(path)
    if found is not fmt:
        what = f"was written by {found.written_by}" if found else "holds no optimizer state of any backend"
        raise UserError(
            f"resume_from_checkpoint: {path} {what}, and strategy {backend} resumes only checkpoints of "
            f"{fmt.written_by}; resume it with the same kind of launch"
            + (" (on any world size)" if found is not None and found.reshards else "")
        )
    saved_file = path / fmt.world_file if fmt.world_file and not fmt.reshards else None
    if saved_file is not None and saved_file.is_file() and int(saved_file.read_text(encoding="utf-8")) != world_size:
        raise UserError(
            f"resume_from_checkpoint: {fmt.written_by} checkpoint of {int(saved_file.read_text(encoding='utf-8'))} "
            f"ranks cannot resume on {world_size}; use the same world size"
        )


def read_trained(path: Path, own: dict) -> dict:
    """The trained tensors of a sharded checkpoint, by the names of `own` (the state dict of the model they go
    into), read offline; unknown names are the caller's to refuse."""
    fmt = sharded(path)
    if fmt is DEEPSPEED:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=fmt.marker, exclude_frozen_parameters=True)
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(Path(path) / DCP.marker))
    saved = reader.read_metadata().state_dict_metadata
    names = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    unknown = [n for n in names if n not in own]
    if unknown:
        return dict.fromkeys(unknown)  # the caller names them
    # Read into buffers of the model's shapes and the shards' dtype (fp32 masters); no process group is needed.
    state = {n: torch.empty(own[n].shape, dtype=saved["model." + n].properties.dtype) for n in names}
    dcp.load({"model": state}, storage_reader=reader)
    return state
