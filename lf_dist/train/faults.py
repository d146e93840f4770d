"""Fault injection for the reliability tests: a crash, a SIGKILL or a signal after a given step.

Armed only by environment variables that tests set; without them `from_env` returns None and the loop runs no
hook at all. Every variable is read here, once per run.

- LF_DIST_FAIL_AT_STEP: raise after that step;
- LF_DIST_KILL_AT_STEP: SIGKILL rank LF_DIST_KILL_RANK (default 1) after that step, on the first attempt of a
  torchrun job only;
- LF_DIST_SIGNAL_AT_STEP: send LF_DIST_SIGNAL (default SIGTERM; SIGINT is a Ctrl-C) after that step to this
  process, or to LF_DIST_SIGNAL_PID (a launcher, which then gets LF_DIST_SIGNAL_WAIT seconds, as a longer step
  would give it), from LF_DIST_SIGNAL_RANK (default: every rank) — the preemption tests;
- LF_DIST_STEP_SECONDS: sleep that long after every step, as a larger model's step would take (the web UI's
  browser test stops a run it watches).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from lf_dist.env_contract import restart_count


def _int(name: str) -> int:
    return int(os.environ.get(name, "0"))


@dataclass(frozen=True)
class Faults:
    fail_at: int
    kill_at: int
    kill_rank: int
    signal_at: int
    signal_name: str
    signal_pid: int
    signal_wait: float
    signal_rank: str | None
    step_seconds: float = 0.0

    def after_step(self, step: int, rank: int) -> None:
        time.sleep(self.step_seconds)
        if step == self.fail_at:
            raise RuntimeError(f"LF_DIST_FAIL_AT_STEP: simulated crash after step {step}")
        if step == self.signal_at and self.signal_rank in (None, str(rank)):
            os.kill(self.signal_pid or os.getpid(), signal.Signals[self.signal_name])
            time.sleep(self.signal_wait)
        if step == self.kill_at and rank == self.kill_rank and restart_count() == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> Faults | None:
    """The faults the environment arms, None when it arms none."""
    faults = Faults(
        fail_at=_int("LF_DIST_FAIL_AT_STEP"),
        kill_at=_int("LF_DIST_KILL_AT_STEP"),
        kill_rank=int(os.environ.get("LF_DIST_KILL_RANK", "1")),
        signal_at=_int("LF_DIST_SIGNAL_AT_STEP"),
        signal_name=os.environ.get("LF_DIST_SIGNAL", "SIGTERM"),
        signal_pid=_int("LF_DIST_SIGNAL_PID"),
        signal_wait=float(os.environ.get("LF_DIST_SIGNAL_WAIT", "0")),
        signal_rank=os.environ.get("LF_DIST_SIGNAL_RANK"),
        step_seconds=float(os.environ.get("LF_DIST_STEP_SECONDS", "0")),
    )
    return faults if faults.fail_at or faults.kill_at or faults.signal_at or faults.step_seconds else None
