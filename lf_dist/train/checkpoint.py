"""checkpoint-N/ directories: written under a temporary name and renamed, rotated, found and restored."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from lf_dist.errors import RunStopped, UserError
from lf_dist.log import get_logger
from lf_dist.parallel import formats
from lf_dist.parallel.formats import RUN_FILE

logger = get_logger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
FILES_FILE = "checkpoint_files.json"  # every file's size in bytes, recorded when the checkpoint was written
# Beside the checkpoints: those of a previous run that this run (overwrite_output_dir) replaces. They stay
# until this run's first checkpoint is complete, and a restart of this run never resumes from them.
SUPERSEDED_FILE = ".lf-dist-superseded.json"


def _step_of(path: Path) -> int | None:
    m = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m and (path / STATE_FILE).is_file() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without trainer_state.json is not complete."""
    if not Path(output_dir).is_dir():
        return []
    found = [(s, p) for p in Path(output_dir).iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def is_preemption(path: Path) -> bool:
    """A checkpoint written because the run was stopped (SIGTERM / SIGINT / a stop request)."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")).get("reason") == "preemption"
    except (OSError, ValueError):
        return False


def supersede(output_dir: Path) -> None:
    """Mark the checkpoints now in output_dir as a previous run's (see SUPERSEDED_FILE)."""
    names = sorted({p.name for p in list_checkpoints(output_dir)} | set(superseded(output_dir)))
    if names:
        (Path(output_dir) / SUPERSEDED_FILE).write_text(json.dumps(names) + "\n", encoding="utf-8")


def superseded(output_dir: Path) -> list[str]:
    try:
        return json.loads((Path(output_dir) / SUPERSEDED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def drop_superseded(output_dir: Path, written: Path | None = None) -> None:
    """This run wrote a checkpoint (`written`) or its final model: the previous run's checkpoints go."""
    for name in superseded(output_dir):
        if written is None or name != written.name:  # a same-named one was replaced by the rename already
            shutil.rmtree(Path(output_dir) / name, ignore_errors=True)
    (Path(output_dir) / SUPERSEDED_FILE).unlink(missing_ok=True)


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
    """Write checkpoint-`step` under a temporary name, record its files' sizes, mark it complete, rename it.
    A write that fails on any rank (disk full, permissions) stops the run in one line on every rank; the
    temporary folder goes, the earlier checkpoints stay as they were."""
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = Path(output_dir) / f".tmp-{PREFIX}{step}"
    error = None
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _attempt(lambda: tmp.mkdir(parents=True))
    strategy.barrier()
    if strategy.all_reduce_sum(1 if error else 0) == 0:
        error = _attempt(lambda: _write_state(tmp, strategy, model, tokenizer, optimizer, scheduler, save_only_model))
    if strategy.all_reduce_sum(1 if error else 0) == 0 and strategy.is_main:
        error = _attempt(lambda: _complete(tmp, final, strategy, state, save_only_model))
    failed = strategy.all_reduce_sum(1 if error else 0)
    if failed:
        if strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        detail = f": {error}" if error else " on another rank"
        raise RunStopped(f"could not write {final.name} in {output_dir}{detail}; the earlier checkpoints are intact")
    if strategy.is_main:
        drop_superseded(output_dir, final)
    if strategy.is_main and total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()
    return final


def _attempt(write) -> str | None:
    """Run a write; the error's one-line description if it fails for a reason of the file system."""
    try:
        write()
    except (OSError, CheckpointException) as err:
        return f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return None


def _write_state(tmp: Path, strategy, model, tokenizer, optimizer, scheduler, save_only_model: bool) -> None:
    strategy.save_checkpoint(model, optimizer, scheduler, tokenizer, tmp, save_only_model)
    if not save_only_model:
        torch.save(rng_state(), tmp / f"rng_state_{strategy.rank}.pth")


def _complete(tmp: Path, final: Path, strategy, state: dict, save_only_model: bool) -> None:
    run = json.dumps(strategy.cfg.to_dict(), indent=2, default=str) + "\n"
    (tmp / RUN_FILE).write_text(run, encoding="utf-8")
    # the size of every file, to find a checkpoint damaged after it was written
    sizes = {str(f.relative_to(tmp).as_posix()): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / FILES_FILE).write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    # trainer_state.json is written last: its presence marks the checkpoint complete.
    payload = {**state, "save_only_model": save_only_model, "dp_size": strategy.dp_size}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files now (missing, truncated), or None if it is intact."""
    path = Path(path)
    try:
        json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{STATE_FILE} is unreadable"
    if not (path / FILES_FILE).is_file():
        return None  # written before sizes were recorded
    try:
        sizes = json.loads((path / FILES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{FILES_FILE} is unreadable"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} of {size:,} bytes"
    return None


def latest_intact(output_dir: Path, skip: list[str] = ()) -> Path | None:
    """The newest complete checkpoint whose files are as they were written; damaged ones are skipped, with a
    warning, and so are those named in `skip`."""
    for path in reversed([p for p in list_checkpoints(output_dir) if p.name not in skip]):
        problem = damage(path)
        if problem is None:
            return path
        logger.info(f"warning: {path.name} is damaged ({problem}); skipping it")
    return None


def resolve_resume(resume, output_dir: Path) -> Path | None:
    """`true` → the latest intact checkpoint in output_dir; a path → that checkpoint, if intact."""
    if resume in (None, False):
        return None
    if resume is True:
        found = latest_intact(output_dir)
        if found is None:
            what = "intact" if list_checkpoints(output_dir) else "complete"
            raise UserError(f"resume_from_checkpoint: no {what} checkpoint in {output_dir}")
        return found
    path = Path(resume)
    if _step_of(path) is None and not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete lf-dist checkpoint")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"resume_from_checkpoint: {path} is damaged ({problem}); give an earlier checkpoint")
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


def check_format(path: Path, strategy) -> None:
    """Refuse, in one line and before anything is written, a checkpoint the run's strategy cannot resume: another
    backend's format, or one of another world size where the format cannot reshard (its marker files only)."""
    formats.check_resumable(path, strategy.checkpoint_format, strategy.world_size, strategy.cfg.train.strategy)
