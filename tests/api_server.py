"""A real `lf-dist api` process for tests: started on a free port of 127.0.0.1, ready once /health answers,
stopped by the test that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from lf_dist.ports import free_port


def start(cfg: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lf-dist api cfg --port P *args`, with the API_* variables of the test's own environment left out unless
    `env` sets them; returns the process and its base URL once it serves. Its stderr goes to a file (a pipe
    nobody reads would fill with access-log lines and stall the server)."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
    full |= {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log = tempfile.TemporaryFile("w+", encoding="utf-8")
    cmd = [sys.executable, "-m", "lf_dist", "api", str(cfg), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, lambda: (log.seek(0), log.read())[1])
    return proc, base


def wait_healthy(proc: subprocess.Popen, base: str, stderr: Callable[[], str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start:\n{stderr()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
