"""checkpoint-N/ directories: written under a temporary name and renamed, rotated, found and restored."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lf_dist.errors import UserError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
RUN_FILE = "lf_dist_run.json"  # the config of the run that wrote a checkpoint (export reads its base model)


def _step_of(path: Path) -> int | None:
    m = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m and (path / STATE_FILE).is_file() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without trainer_state.json is not complete."""
    if not Path(output_dir).is_dir():
        return []
    found = [(s, p) for p in Path(output_dir).iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    strategy,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict,
    save_only_model: bool,
    total_limit: int | None,
) -> Path:
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = Path(output_dir) / f".tmp-{PREFIX}{step}"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save_checkpoint(model, optimizer, scheduler, tokenizer, tmp, save_only_model)
    if not save_only_model:
        torch.save(rng_state(), tmp / f"rng_state_{strategy.rank}.pth")
    strategy.barrier()
    if strategy.is_main:
        run = json.dumps(strategy.cfg.to_dict(), indent=2, default=str) + "\n"
        (tmp / RUN_FILE).write_text(run, encoding="utf-8")
        # trainer_state.json is written last: its presence marks the checkpoint complete.
        (tmp / STATE_FILE).write_text(
            json.dumps({**state, "save_only_model": save_only_model}, indent=2), encoding="utf-8"
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()
    return final


def resolve_resume(resume, output_dir: Path) -> Path | None:
    """`true` → the latest complete checkpoint in output_dir; a path → that checkpoint."""
    if resume in (None, False):
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(resume)
    if _step_of(path) is None and not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete lf-dist checkpoint")
    return path


def load_state(path: Path) -> dict:
    state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("save_only_model"):
        raise UserError(f"resume_from_checkpoint: {path} was saved with save_only_model (no optimizer state)")
    return state


def restore_rng(path: Path, rank: int) -> None:
    file = Path(path) / f"rng_state_{rank}.pth"
    if file.is_file():
        set_rng_state(torch.load(file, weights_only=False))
