"""Start `torch.distributed.run` with an argument list (no shell) and pass its exit code back.

Errors a user can cause inside the ranks (a bad dataset, say) are reported once: the failing rank writes the
message to LF_DIST_ERROR_FILE and exits 2; this launcher prints that one line and hides torchrun's traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lf_dist.env_contract import int_env
from lf_dist.errors import RunStopped, UserError
from lf_dist.log import get_logger
from lf_dist.ports import free_port
from lf_dist.signals import on_signals

logger = get_logger(__name__)
USER_ERROR_EXIT = 2


def torchrun_args(config_path: str, overrides: list[str], nproc: int) -> list[str]:
    """The torchrun command line for this node, from the environment contract (`nproc` from the plan)."""
    nnodes, node_rank = int_env("NNODES", 1), int_env("NODE_RANK", 0)
    master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = os.environ.get("MASTER_PORT") or str(free_port())
    if not 0 <= node_rank < nnodes:
        raise UserError(f"NODE_RANK: must be in [0, {nnodes}), got {node_rank}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if os.environ.get("RDZV_ID"):  # elastic: nodes may join and leave between MIN_NNODES and MAX_NNODES
        min_n, max_n = int_env("MIN_NNODES", nnodes), int_env("MAX_NNODES", nnodes)
        cmd += [
            "--nnodes",
            f"{min_n}:{max_n}",
            "--rdzv-id",
            os.environ["RDZV_ID"],
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{master_addr}:{master_port}",
        ]
    else:
        cmd += [
            "--nnodes",
            str(nnodes),
            "--node-rank",
            str(node_rank),
            "--master-addr",
            master_addr,
            "--master-port",
            str(master_port),
        ]
    if os.environ.get("MAX_RESTARTS"):
        cmd += ["--max-restarts", str(int_env("MAX_RESTARTS", 0))]
    return cmd + ["-m", "lf_dist.launchers.entry", "train", str(config_path), *overrides]


def wait_for_master(addr: str, port: int, timeout: float) -> None:
    """Nodes other than 0 check that the master answers before starting, and fail in one line if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"cannot reach the master at {addr}:{port} within ddp_timeout ({timeout:.0f} s); "
                    "check MASTER_ADDR / MASTER_PORT and that node 0 is running"
                ) from None
            time.sleep(1)


def _pump(fd: int, error_file: Path) -> None:
    """Forward torchrun's stderr as it comes (progress bars included); once a rank reported a user error,
    drop torchrun's traceback dump that follows."""
    markers = ("Traceback", "ChildFailedError", "=====")
    while chunk := os.read(fd, 65536):
        text = chunk.decode("utf-8", errors="replace")
        if error_file.exists():
            cut = min((i for i in (text.find(m) for m in markers) if i >= 0), default=-1)
            if cut >= 0:
                sys.stderr.write(text[:cut])
                sys.stderr.flush()
                while os.read(fd, 65536):  # keep draining so torchrun never blocks on a full pipe
                    pass
                return
        sys.stderr.write(text)
        sys.stderr.flush()


def _forward_signals(proc):
    """While torchrun runs: the first SIGTERM / SIGINT goes on to it (the ranks then write a preemption
    checkpoint); later ones are dropped, so torchrun's own shutdown is not cut short."""
    sent = []

    def forward(signum, frame):
        if not sent:
            sent.append(signum)
            proc.send_signal(signum)

    return on_signals(forward)


# CPU ranks: glibc serves blocks of 4 MiB and more with mmap and unmaps them when freed. Its default raises that
# threshold to the size of each freed block, so the per-layer buffers FSDP2's all-gathers allocate and free every
# step end up kept in the heap: measured on a 100M-parameter LoRA run, 2 ranks then peaked above 1 rank
# (1.26 GB vs 1.18 GB per process); with the fixed threshold at 0.90 GB. A user's own setting is kept.
CPU_MMAP_THRESHOLD = str(4 * 2**20)


def launch_torchrun(config_path: str, overrides: list[str], cfg, plan) -> int:
    cmd = torchrun_args(config_path, overrides, plan.nproc_per_node)
    node_rank = int_env("NODE_RANK", 0)
    if node_rank > 0 and not os.environ.get("RDZV_ID"):
        wait_for_master(
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int_env("MASTER_PORT", 29500), float(cfg.train.ddp_timeout)
        )
    with tempfile.TemporaryDirectory() as tmp:
        error_file, plan_file = Path(tmp) / "user_error.txt", Path(tmp) / "plan.json"
        plan.save(plan_file)  # every rank runs the parent's plan instead of deciding again
        env = {**os.environ, "LF_DIST_ERROR_FILE": str(error_file), "LF_DIST_PLAN": str(plan_file)}
        if plan.device == "cpu":  # see CPU_MMAP_THRESHOLD
            env.setdefault("MALLOC_MMAP_THRESHOLD_", CPU_MMAP_THRESHOLD)
        logger.info("launching: " + " ".join(cmd[1:]))
        # its own session: a signal meant for the run (Ctrl-C, a scheduler's SIGTERM to this process or its group)
        # reaches torchrun once, through `_forward_signals`, and torchrun hands it to every rank once
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stderr.fileno(), error_file), daemon=True)
        pump.start()
        with _forward_signals(proc):
            code = proc.wait()
        pump.join(5)
        if error_file.exists():
            record = json.loads(error_file.read_text(encoding="utf-8"))
            if record["exit_code"] == USER_ERROR_EXIT:
                raise UserError(record["message"])
            raise RunStopped(record["message"], record["exit_code"], record["label"])
    return code
