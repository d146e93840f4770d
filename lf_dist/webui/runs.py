"""Runs the web UI starts: launch, stop, resume (their files and states: run_state.py).

A launch writes the form's YAML beside the output_dir (`NAME.train.yaml`) and starts a supervisor in a session of
its own (`python -m lf_dist.webui.runs STATE`), which runs `lf-dist train NAME.train.yaml` with the launch contract
of the ranks asked for, records its own pid, the run's and the exit code, and appends the run's output to its log.
Nothing of a run lives in the web UI's process: closing the page or stopping the server leaves training running.
Stop is SIGTERM to `lf-dist train` (a preemption checkpoint, exit 75); Resume starts the same command again, which
resumes from that checkpoint. (On Windows, which has no SIGTERM to catch, Stop writes the run's stop-request
file, which rank 0 reads after every step, to the same effect.)
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lf_dist.errors import UserError
from lf_dist.signals import STOP_FILE
from lf_dist.webui.run_state import ATTEMPT, find_runs, read_state, state, state_path, yaml_path

YAML_MARK = "# written by lf-dist webui: `lf-dist train` runs this file as it is\n"
LAUNCH_KEYS = ("FORCE_TORCHRUN", "NPROC_PER_NODE")  # the launch contract the form sets (ranks)
_LAUNCHING = threading.Lock()  # one launch at a time: the running check and the start are one step
_SUPERVISORS: dict[Path, subprocess.Popen] = {}  # started here: polled, so an ended one is reaped at once


def supervising() -> set[Path]:
    return {out for out, proc in _SUPERVISORS.items() if proc.poll() is None}


def run_state(output_dir: Path) -> dict:
    return state(output_dir, output_dir in supervising())


def runs_under(root: Path) -> list[dict]:
    return find_runs(root, supervising())


def _write_state(path: Path, values: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the server and the supervisor never share one
    tmp.write_text(json.dumps(values), encoding="utf-8")
    os.replace(tmp, path)


def write_yaml(output_dir: Path, text: str) -> Path:
    """The form's YAML beside the run; a file of the same name that the web UI did not write is never replaced."""
    path = yaml_path(output_dir)
    if path.exists() and not path.read_text(encoding="utf-8").startswith(YAML_MARK):
        raise UserError(f"{path} exists and was not written by lf-dist webui; choose another output_dir or move it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(YAML_MARK + text, encoding="utf-8")
    return path


def launch(output_dir: Path, yaml_text: str | None, env: dict[str, str]) -> dict:
    """Write the YAML (None: the run's own, for a resume) and start the supervisor of `lf-dist train` on it;
    refused, with nothing written, while the output_dir is running."""
    with _LAUNCHING:
        if run_state(output_dir)["state"] == "running":
            raise UserError(f"output_dir: {output_dir} is running; stop it first or choose another output_dir")
        config = write_yaml(output_dir, yaml_text) if yaml_text is not None else Path(read_state(output_dir)["config"])
        (output_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt is not this one's
        started = datetime.datetime.now().isoformat(timespec="seconds")
        path = state_path(output_dir)
        values = {"output_dir": str(output_dir), "config": str(config), "env": env, "started": started}
        _write_state(path, {**values, "cwd": os.getcwd()})
        if os.name == "posix":
            detach = {"start_new_session": True}
        else:  # no console of the server's: closing it leaves the run
            detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS}
        _SUPERVISORS[output_dir] = subprocess.Popen(
            [sys.executable, "-m", "lf_dist.webui.runs", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **detach,
        )
        return {**run_state(output_dir), "yaml": str(config)}


def resume(output_dir: Path) -> dict:
    """The same command again: `lf-dist train` resumes from the run's latest checkpoint."""
    saved = read_state(output_dir)
    if saved is None:
        raise UserError(f"{output_dir} was not started from the web UI; run its command again to resume it")
    return launch(output_dir, None, saved.get("env", {}))


def stop(output_dir: Path) -> dict:
    """SIGTERM to the run's `lf-dist train`: it writes a preemption checkpoint and ends with exit code 75."""
    current = run_state(output_dir)
    pid = (read_state(output_dir) or {}).get("pid")
    if current["state"] != "running" or not pid:
        raise UserError(f"{output_dir} is not running (or not from the web UI, or still starting)")
    if os.name == "posix":
        os.kill(pid, signal.SIGTERM)
    else:  # Windows has no SIGTERM to catch (os.kill would end the process): the run's stop-request file instead
        (output_dir / STOP_FILE).write_text("stop\n", encoding="utf-8")
    return current


def supervise(path: Path) -> int:
    """The supervisor: `lf-dist train CONFIG` with the saved launch contract, pids and exit code recorded."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}  # the form's ranks, not the server's
    env.update(saved.get("env", {}), PYTHONUTF8="1")
    with open(path.with_suffix(".log"), "a", encoding="utf-8") as out:
        out.write(f"{ATTEMPT}{saved['started']}: lf-dist train {saved['config']} ===\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lf_dist", "train", saved["config"]],
            cwd=saved.get("cwd"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _write_state(path, {**saved, "supervisor": os.getpid(), "pid": proc.pid})
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # a stop meant for the run
        rc = proc.wait()
    (Path(saved["output_dir"]) / STOP_FILE).unlink(missing_ok=True)  # answered: a later CLI run must not stop at once
    _write_state(path, {**saved, "supervisor": os.getpid(), "pid": proc.pid, "rc": rc})
    return rc


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
