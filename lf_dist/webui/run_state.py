"""Where a run's web UI files live and what state a run is in, for a run the web UI started or any output_dir
that `lf-dist train` wrote: running, finished, preempted, failed (with its one-line error), stopped, new.

Beside an output_dir NAME (never in it, as the output_dir lock): `NAME.train.yaml` (the form's config),
`.NAME.lf-dist.webui.json` (the supervisor's record: config, launch environment, pids, exit code) and
`.NAME.lf-dist.webui.log` (the output of every attempt, each after an ATTEMPT line).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from lf_dist.errors import EXIT_PREEMPTED
from lf_dist.launchers.lock import beside, lock_path
from lf_dist.train.checkpoint import is_preemption, list_checkpoints

MARKERS = ("trainer_log.jsonl", "lf_dist_config.json", "all_results.json")
ATTEMPT = "=== lf-dist webui: started "  # the first line of each attempt in the run's log
STATE_SUFFIX = ".lf-dist.webui.json"
LOG_TAIL = 256 * 1024  # the bytes of a run's output the page reads: its last lines


def yaml_path(output_dir: Path) -> Path:
    return output_dir.parent / f"{output_dir.name}.train.yaml"


def state_path(output_dir: Path) -> Path:
    return beside(output_dir, "webui.json")


def log_path(output_dir: Path) -> Path:
    return beside(output_dir, "webui.log")


def read_state(output_dir: Path) -> dict | None:
    try:
        return json.loads(state_path(output_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    code = ctypes.c_ulong()
    try:
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _lock_holder(output_dir: Path) -> int | None:
    """The pid of the `lf-dist train` holding the output_dir lock on this machine, if one is recorded."""
    try:
        owner = json.loads(lock_path(output_dir).with_suffix(".owner").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner.get("pid") if owner.get("host") == socket.gethostname() else None


def log_lines(output_dir: Path, count: int = 30) -> list[str]:
    """The last `count` lines of the latest attempt's output, a progress bar redrawn in place as its last state."""
    try:
        with open(log_path(output_dir), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    text = text[text.rfind(ATTEMPT) :] if ATTEMPT in text else text
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    kept = [ln for ln, nxt in zip(lines, [*lines[1:], ""]) if not (_bar(ln) and _bar(nxt) == _bar(ln))]
    return kept[-count:]


def _bar(line: str) -> str | None:
    """The label of a tqdm progress bar line (`train:  92%|...`), None for another line."""
    head, sep, _ = line.partition("%|")
    return head.rsplit(" ", 1)[0].strip() if sep and ":" in head else None


def _error_line(output_dir: Path) -> str:
    lines = log_lines(output_dir, 200)
    ours = [ln for ln in lines if ln.startswith("lf-dist: ")]
    return (ours or lines or [""])[-1]


def state(output_dir: Path, supervising: bool = False) -> dict:
    """The run's state; `supervising`: this process started its supervisor, which has not ended yet."""
    saved = read_state(output_dir) or {}
    out = {"output_dir": str(output_dir), "config": saved.get("config"), "started": saved.get("started")}
    attempt = "rc" not in saved and (supervising or alive(saved.get("supervisor")))
    if attempt or alive(_lock_holder(output_dir)):  # a CLI run of the same output_dir counts too
        return {**out, "state": "running"}
    rc = saved.get("rc")
    checkpoints = list_checkpoints(output_dir) if output_dir.is_dir() else []
    if rc == 0 or (rc is None and (output_dir / "all_results.json").is_file()):
        return {**out, "state": "finished"}
    if rc == EXIT_PREEMPTED or (rc is None and checkpoints and is_preemption(checkpoints[-1])):
        return {**out, "state": "preempted"}
    if rc is not None:
        return {**out, "state": "failed", "error": _error_line(output_dir) or f"exit code {rc}"}
    return {**out, "state": "stopped" if output_dir.is_dir() else "new"}


def run_dirs(root: Path, depth: int = 4) -> set[Path]:
    """The output_dirs under `root`, `depth` folders down at most: a folder holding a run's log, config or
    results, or named by a web UI record; checkpoints are not walked into."""
    found: set[Path] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        level = len(here.relative_to(root).parts)
        dirs[:] = [] if level >= depth else [d for d in dirs if not d.startswith(("checkpoint-", "."))]
        if any(name in files for name in MARKERS):
            found.add(here)
        found.update(here / f[1 : -len(STATE_SUFFIX)] for f in files if f.startswith(".") and f.endswith(STATE_SUFFIX))
    return found


def _mtime(output_dir: Path) -> float:
    for path in (output_dir / "trainer_log.jsonl", state_path(output_dir), output_dir):
        if path.exists():
            return path.stat().st_mtime
    return 0.0


def find_runs(root: Path, supervising=frozenset()) -> list[dict]:
    """Every run under `root` with its state, the most recently active first."""
    runs = [state(d, d in supervising) for d in run_dirs(root)]
    return sorted(runs, key=lambda r: _mtime(Path(r["output_dir"])), reverse=True)
