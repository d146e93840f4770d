"""Distributed runs on CPU (gloo) beyond plain parity: checkpoints resumed on another world size or after a
crash, a killed rank restarted, an unreachable master and a user error inside the ranks, each in one line.

Each case starts real processes through `lf-dist train` with FORCE_TORCHRUN=1 (torchrun underneath), as a
user would, and a resumed or restarted run must end where the uninterrupted one does. That every backend trains
to the 1-process run's losses and weights is tests/test_parity_table.py; the helpers here (the config, the
launcher, the comparisons) are shared with it and the other distributed modules.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import DATA_DIR, TINY_MODEL

pytestmark = pytest.mark.slow
STEPS = 10


def _config(tmp_path: Path, method: str) -> Path:
    path = tmp_path / f"{method}.yaml"
    lr = 5e-3 if method == "lora" else 1e-3
    path.write_text(
        f"""model_name_or_path: {TINY_MODEL}
dataset: alpaca_demo
dataset_dir: {DATA_DIR}
template: chatml
cutoff_len: 96
max_samples: 96
finetuning_type: {method}
per_device_train_batch_size: 2
learning_rate: {lr}
lr_scheduler_type: cosine
max_steps: {STEPS}
logging_steps: 1
save_steps: 1000
disable_tqdm: true
overwrite_output_dir: true
disable_gradient_checkpointing: true
""",
        encoding="utf-8",
    )
    return path


def lf_dist_train(
    config: Path,
    *overrides: str,
    nproc: int | None = 2,
    env: dict | None = None,
    timeout: int = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc is not None:
        full_env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(nproc))
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(config), *overrides],
        env=full_env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out: Path) -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e]


def weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(out / name)


def assert_same_training(out: Path, ref: Path, atol: float = 1e-4) -> None:
    assert losses(out) == pytest.approx(losses(ref), abs=atol), (losses(out), losses(ref))
    w, r = weights(out), weights(ref)
    assert w.keys() == r.keys()
    for k in r:
        torch.testing.assert_close(w[k], r[k], rtol=1e-3, atol=atol)


def single_run(tmp_path_factory, method: str) -> Path:
    """The 1-process run of `method` with the 2-rank runs' global batch (4), made once per session: this module
    and tests/test_parity_table.py compare with the same runs."""
    root = tmp_path_factory.getbasetemp() / "single_runs"
    out = root / method
    if not (out / "all_results.json").is_file():  # written last, by a run that finished
        root.mkdir(exist_ok=True)
        lf_dist_train(_config(root, method), f"output_dir={out}", "per_device_train_batch_size=4", nproc=None)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1-process runs with the same global batch (4): reference / "full" and reference / "lora"."""
    return [single_run(tmp_path_factory, method) for method in ("full", "lora")][0].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_checkpoint_resumes_on_another_world_size(reference, tmp_path):
    """Saved by 2 ranks (DCP shards), resumed by 1 rank with the same global batch: same run as uninterrupted."""
    config, out = _config(tmp_path, "lora"), tmp_path / "out"
    crashed = lf_dist_train(
        config, f"output_dir={out}", "strategy=fsdp2", "save_steps=4", env={"LF_DIST_FAIL_AT_STEP": "6"}, check=False
    )
    assert crashed.returncode != 0
    assert (out / "checkpoint-4" / "dcp").is_dir() and not (out / "checkpoint-8").exists()
    assert len(list((out / "checkpoint-4" / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    resumed = lf_dist_train(
        config,
        f"output_dir={out}",
        "strategy=fsdp2",
        "resume_from_checkpoint=true",
        "overwrite_output_dir=false",
        "per_device_train_batch_size=4",
        nproc=1,
    )
    assert_same_training(out, reference / "lora")
    (notice,) = [line for line in resumed.stderr.splitlines() if "resuming checkpoint-4 with changes" in line]
    # the same global batch: goes on, with one notice line
    assert "per_device_train_batch_size 2 → 4" in notice and "data-parallel ranks 2 → 1" in notice


def test_deepspeed_zero3_resumed_after_a_crash_matches_the_uninterrupted_run(reference, tmp_path):
    config, out = _config(tmp_path, "full"), tmp_path / "out"
    ds = f"deepspeed={Path(__file__).parents[1] / 'examples/deepspeed/ds_z3_config.json'}"
    crashed = lf_dist_train(
        config, f"output_dir={out}", ds, "save_steps=4", env={"LF_DIST_FAIL_AT_STEP": "6"}, check=False
    )
    assert crashed.returncode != 0 and (out / "checkpoint-4" / "ds").is_dir()
    lf_dist_train(config, f"output_dir={out}", ds, "resume_from_checkpoint=true", "overwrite_output_dir=false")
    assert_same_training(out, reference / "full")


def test_killed_rank_restarts_group_and_finishes_like_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path, "full")
    ref, out = tmp_path / "ref", tmp_path / "out"
    lf_dist_train(config, f"output_dir={ref}", "strategy=fsdp2")
    lf_dist_train(
        config,
        f"output_dir={out}",
        "strategy=fsdp2",
        "save_steps=4",
        env={"MAX_RESTARTS": "1", "LF_DIST_KILL_AT_STEP": "6", "LF_DIST_KILL_RANK": "1"},
        timeout=400,
    )
    assert losses(out) == losses(ref)
    w, r = weights(out), weights(ref)
    for k in r:
        assert torch.equal(w[k], r[k]), k


def test_unreachable_master_fails_within_ddp_timeout_in_one_line(tmp_path):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    start = time.monotonic()
    proc = lf_dist_train(
        _config(tmp_path, "full"), f"output_dir={tmp_path / 'o'}", "ddp_timeout=4", env=env, check=False, timeout=60
    )
    assert proc.returncode == 2 and time.monotonic() - start < 40
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("lf-dist: error: cannot reach the master at 127.0.0.1:"), lines[-3:]
    assert "Traceback" not in proc.stderr


def test_user_error_inside_ranks_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"broken": {"file_name": "broken.json"}}', encoding="utf-8")
    (data / "broken.json").write_text('[{"instruction": "a" "output": 1}]', encoding="utf-8")
    proc = lf_dist_train(
        _config(tmp_path, "full"), f"output_dir={tmp_path / 'o'}", "dataset=broken", f"dataset_dir={data}", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lf-dist: error: dataset 'broken': ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
