"""Runs the web UI starts, and every run it finds: launch, state, stop, resume.

A launch writes the form's YAML beside the output_dir (`NAME.train.yaml`) and starts a supervisor in a session of
its own (`python -m lf_dist.webui.runs STATE`), which runs `lf-dist train NAME.train.yaml` with the launch contract
of the ranks asked for, its output in `.NAME.lf-dist.webui.log`, and records its pid and exit code in
`.NAME.lf-dist.webui.json`. Nothing of a run lives in the web UI's process: closing the page or stopping the server
leaves training running. Stop is SIGTERM to `lf-dist train` (a preemption checkpoint, exit 75); Resume starts
the same command again, which resumes from that checkpoint. (On Windows, which has no SIGTERM to catch, Stop
writes the run's stop-request file, which rank 0 reads after every step, to the same effect.)
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lf_dist.errors import EXIT_PREEMPTED, UserError
from lf_dist.launchers.lock import beside
from lf_dist.signals import STOP_FILE
from lf_dist.train.checkpoint import is_preemption, list_checkpoints

YAML_MARK = "# written by lf-dist webui: `lf-dist train` runs this file as it is\n"
MARKERS = ("trainer_log.jsonl", "lf_dist_config.json", "all_results.json")
ATTEMPT = "=== lf-dist webui: started "  # the first line of each attempt in the run's log


def yaml_path(output_dir: Path) -> Path:
    return output_dir.parent / f"{output_dir.name}.train.yaml"


def state_path(output_dir: Path) -> Path:
    return beside(output_dir, "webui.json")


def log_path(output_dir: Path) -> Path:
    return beside(output_dir, "webui.log")


def _read_state(output_dir: Path) -> dict | None:
    try:
        return json.loads(state_path(output_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, path)


def _alive(pid: int | None) -> bool:
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


def write_yaml(output_dir: Path, text: str) -> Path:
    """The form's YAML beside the run; a file of the same name that the web UI did not write is never replaced."""
    path = yaml_path(output_dir)
    if path.exists() and not path.read_text(encoding="utf-8").startswith(YAML_MARK):
        raise UserError(f"{path} exists and was not written by lf-dist webui; choose another output_dir or move it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(YAML_MARK + text, encoding="utf-8")
    return path


def launch(output_dir: Path, config: Path, env: dict[str, str]) -> dict:
    """Start the supervisor of `lf-dist train config` in its own session; refused while this run is running."""
    if state(output_dir)["state"] == "running":
        raise UserError(f"output_dir: {output_dir} is running; stop it first or choose another output_dir")
    path = state_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    (output_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt is not this one's
    started = datetime.datetime.now().isoformat(timespec="seconds")
    _write_state(path, {"config": str(config), "env": env, "started": started, "cwd": os.getcwd()})
    kwargs = (
        {"start_new_session": True} if os.name == "posix" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "lf_dist.webui.runs", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,
    )
    _write_state(path, {**_read_state(output_dir), "supervisor": proc.pid})
    return state(output_dir)


def resume(output_dir: Path) -> dict:
    """The same command again: `lf-dist train` resumes from the run's latest checkpoint."""
    saved = _read_state(output_dir)
    if saved is None:
        raise UserError(f"{output_dir} was not started from the web UI; run its command again to resume it")
    return launch(output_dir, Path(saved["config"]), saved.get("env", {}))


def stop(output_dir: Path) -> dict:
    """SIGTERM to the run's `lf-dist train`: it writes a preemption checkpoint and ends with exit code 75."""
    current = state(output_dir)
    pid = (_read_state(output_dir) or {}).get("pid")
    if current["state"] != "running" or not pid:
        raise UserError(f"{output_dir} is not running")
    if os.name == "posix":
        os.kill(pid, signal.SIGTERM)
    else:  # Windows has no SIGTERM to catch (os.kill would end the process): the run's stop-request file instead
        (output_dir / STOP_FILE).write_text("stop\n", encoding="utf-8")
    return current


def log_lines(output_dir: Path, count: int = 30) -> list[str]:
    """The last `count` lines of the latest attempt's output (progress bars' redraws as separate lines)."""
    try:
        text = log_path(output_dir).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    text = text[text.rfind(ATTEMPT) :] if ATTEMPT in text else text
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    # a progress bar redrawn in place: its last state only
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


def _finished(output_dir: Path) -> bool:
    return (output_dir / "all_results.json").is_file()


def state(output_dir: Path) -> dict:
    """running | finished | preempted | failed (with its one-line error) | stopped (no exit code was recorded) |
    new, for a run the web UI started or any output_dir a `lf-dist train` wrote."""
    saved = _read_state(output_dir) or {}
    out = {"output_dir": str(output_dir), "config": saved.get("config"), "started": saved.get("started")}
    owner = beside(output_dir, "lock").with_suffix(".owner")
    try:
        holder = json.loads(owner.read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError):
        holder = None
    checkpoints = list_checkpoints(output_dir) if output_dir.is_dir() else []
    if "rc" not in saved and (_alive(saved.get("supervisor")) or _alive(holder)):
        return {**out, "state": "running"}
    rc = saved.get("rc")
    if rc == 0 or (rc is None and _finished(output_dir)):
        return {**out, "state": "finished"}
    if rc == EXIT_PREEMPTED or (rc is None and checkpoints and is_preemption(checkpoints[-1])):
        return {**out, "state": "preempted"}
    if rc is not None:
        return {**out, "state": "failed", "error": _error_line(output_dir) or f"exit code {rc}"}
    return {**out, "state": "stopped" if output_dir.is_dir() else "new"}


def find_runs(root: Path, depth: int = 4) -> list[dict]:
    """The output_dirs under `root` (a folder holding a run's log, config or results, or a web UI run) with their
    state, newest first."""
    found: set[Path] = set()
    if root.is_dir():
        for path in root.rglob("*"):
            if len(path.relative_to(root).parts) > depth + 1:
                continue
            if path.name in MARKERS and path.is_file():
                found.add(path.parent)
            elif path.name.endswith(".lf-dist.webui.json") and path.name.startswith("."):
                found.add(path.parent / path.name[1 : -len(".lf-dist.webui.json")])
    runs = [state(d) for d in found if not any(part.startswith("checkpoint-") for part in d.parts)]
    return sorted(runs, key=lambda r: _mtime(Path(r["output_dir"])), reverse=True)


def _mtime(output_dir: Path) -> float:
    for path in (output_dir / "trainer_log.jsonl", state_path(output_dir), output_dir):
        if path.exists():
            return path.stat().st_mtime
    return 0.0


def supervise(path: Path) -> int:
    """The supervisor: `lf-dist train CONFIG` with the saved environment, its pid and exit code recorded."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    log = path.with_suffix(".log")
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"{ATTEMPT}{saved['started']}: lf-dist train {saved['config']} ===\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lf_dist", "train", saved["config"]],
            cwd=saved.get("cwd"),
            env={**os.environ, **saved.get("env", {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _write_state(path, {**json.loads(path.read_text(encoding="utf-8")), "pid": proc.pid})
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # a stop meant for the run
        rc = proc.wait()
    _write_state(path, {**json.loads(path.read_text(encoding="utf-8")), "rc": rc})
    return rc


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
