"""One run per output_dir: `lf-dist train` holds an OS file lock beside output_dir while it runs.

The lock is the operating system's (flock / msvcrt through `filelock`), so a run that dies — killed, out of
memory, the machine rebooted — holds nothing: the next run takes it. The holder's pid and host are written next
to it, for the refusal line. On a multi-node launch, node 0 holds it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path

from lf_dist.env_contract import int_env
from lf_dist.errors import UserError


def lock_path(output_dir: str | Path) -> Path:
    return beside(output_dir, "lock")


def beside(output_dir: str | Path, what: str) -> Path:
    """A control file of the run next to output_dir, never in it (output_dir must stay empty until the workers
    have checked it): `.NAME.lf-dist.WHAT`."""
    out = Path(output_dir).resolve()
    return out.parent / f".{out.name}.lf-dist.{what}"


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path):
    if int_env("NODE_RANK", 0) != 0:
        yield
        return
    from filelock import FileLock, Timeout

    path = lock_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = json.loads(owner.read_text(encoding="utf-8"))
            holder = f" (pid {who['pid']} on {who['host']}, since {who['since']})"
        except (OSError, ValueError, KeyError):
            holder = ""
        raise UserError(
            f"output_dir: {Path(output_dir)} is in use by another lf-dist train{holder}; wait for it to finish "
            "or choose another output_dir"
        ) from None
    since = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}), encoding="utf-8")
    try:
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()  # the (empty) lock file stays: deleting it could let two later runs lock two files
