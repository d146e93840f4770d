"""Reliability: preemption writes a checkpoint that resumes bitwise, resume refuses what it cannot continue,
damaged checkpoints are skipped, failed writes stop in one line, one run per output_dir, non-finite steps."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lf_dist.cli import main
from lf_dist.errors import EXIT_FAILED, EXIT_PREEMPTED
from lf_dist.train import checkpoint as ckpt

from .conftest import base_overrides

STEPS = 6


def _yaml(tmp_path: Path, out: Path, **extra) -> Path:
    """A YAML file of the small LoRA run (the console reads files, as users run it)."""
    path = tmp_path / f"{out.name}.yaml"
    values = {"max_steps": STEPS, "save_strategy": "no", **extra}
    lines = [o.replace("=", ": ", 1) for o in base_overrides(out, **values)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cli(config: Path, *overrides: str, env: dict | None = None, timeout: int = 180):
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(config), *overrides],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def _bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lf-dist: ")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    out = root / "ref"
    proc = _cli(_yaml(root, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_bitwise(uninterrupted, tmp_path):
    out = tmp_path / "run"
    config = _yaml(tmp_path, out)  # save_strategy: no — the preemption checkpoint is written all the same
    proc = _cli(config, env={"LF_DIST_SIGNAL_AT_STEP": "3"})
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert line.startswith("lf-dist: preempted: stopped by SIGTERM after step 3; preemption checkpoint-3")
    assert "Traceback" not in proc.stderr
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["reason"] == "preemption" and state["global_step"] == 3
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a stopped run

    again = _cli(config)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert _bitwise(_adapter(out), _adapter(uninterrupted))


def test_ctrl_c_then_the_same_command_with_overwrite_output_dir_resumes_bitwise(uninterrupted, tmp_path):
    """LLaMA-Factory's examples all set overwrite_output_dir: true; the command a user reruns after Ctrl-C must
    not throw the preemption checkpoint away."""
    out = tmp_path / "run"
    config = _yaml(tmp_path, out, overwrite_output_dir=True)
    proc = _cli(config, env={"LF_DIST_SIGNAL_AT_STEP": "3", "LF_DIST_SIGNAL": "SIGINT"})
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert _error_lines(proc.stderr)[-1].startswith("lf-dist: preempted: stopped by SIGINT after step 3")
    again = _cli(config)
    assert again.returncode == 0, again.stderr[-3000:]
    notices = [line for line in again.stderr.splitlines() if "written when the last run was stopped" in line]
    assert len(notices) == 1 and "resume_from_checkpoint: false" in notices[0]
    assert _bitwise(_adapter(out), _adapter(uninterrupted))


def test_overwrite_output_dir_replaces_old_checkpoints_only_when_the_new_run_writes_its_own(tmp_path):
    out = tmp_path / "run"
    first = _cli(_yaml(tmp_path, out, save_strategy="steps", save_steps=2))  # checkpoint-2, -4
    assert first.returncode == 0, first.stderr[-3000:]
    old = {p.name: (p / "trainer_state.json").stat().st_mtime_ns for p in ckpt.list_checkpoints(out)}
    assert sorted(old) == ["checkpoint-2", "checkpoint-4"]
    # starts over; crashes after step 3, before its first checkpoint (at 5): the old checkpoints are all there
    config = _yaml(tmp_path, out, save_strategy="steps", save_steps=5, max_steps=8, overwrite_output_dir=True)
    crashed = _cli(config, env={"LF_DIST_FAIL_AT_STEP": "3"})
    assert crashed.returncode != 0
    assert {p.name: (p / "trainer_state.json").stat().st_mtime_ns for p in ckpt.list_checkpoints(out)} == old
    done = _cli(config)  # starts over again (not from the previous run's checkpoint-4), writes checkpoint-5
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-5"]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["current_steps"] for e in log if "loss" in e] == list(range(1, 9))


def test_a_second_signal_during_the_save_does_not_cut_it_short(tmp_path, monkeypatch, capsys):
    real = ckpt._write_state

    def signalled_again(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler insists while the checkpoint is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "_write_state", signalled_again)
    monkeypatch.setenv("LF_DIST_SIGNAL_AT_STEP", "2")
    out = tmp_path / "run"
    assert main(["train", str(_yaml(tmp_path, out))]) == EXIT_PREEMPTED
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-2"] and ckpt.damage(out / "checkpoint-2") is None
    assert not list(out.glob(".tmp-*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it


def _crashed_run(tmp_path: Path, crash_at: int = 5, save_steps: int = 2) -> tuple[Path, Path]:
    out = tmp_path / "run"
    config = _yaml(tmp_path, out, save_strategy="steps", save_steps=save_steps)
    proc = _cli(config, env={"LF_DIST_FAIL_AT_STEP": str(crash_at)})
    assert proc.returncode != 0 and (out / "checkpoint-4").is_dir()
    return config, out


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora_rank=16", "lora_rank is 16 now but 8 in checkpoint-4; set it back to 8"),
        ("template=llama3", "template is 'llama3' now but 'chatml' in checkpoint-4"),
        ("cutoff_len=64", "cutoff_len is 64 now but 128 in checkpoint-4"),
        ("per_device_train_batch_size=2", "the global batch is 2 now"),
    ],
)
def test_a_resume_that_cannot_continue_is_refused_in_one_line_before_loading(tmp_path, override, named):
    config, out = _crashed_run(tmp_path)
    before = (out / "lf_dist_config.json").read_text(encoding="utf-8")
    proc = _cli(config, override, "resume_from_checkpoint=true")
    assert proc.returncode == 2
    (line,) = _error_lines(proc.stderr)
    assert named in line and "Traceback" not in proc.stderr
    assert (out / "lf_dist_config.json").read_text(encoding="utf-8") == before  # nothing was touched


def test_a_resume_with_a_new_learning_rate_and_more_steps_goes_on_with_a_notice(tmp_path):
    config, out = _crashed_run(tmp_path)
    proc = _cli(config, "learning_rate=5e-4", "max_steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notice = [line for line in proc.stderr.splitlines() if "resuming checkpoint-4 with changes" in line]
    assert len(notice) == 1 and "learning_rate 0.001 → 0.0005" in notice[0] and "max_steps 6 → 8" in notice[0]
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    lr = {e["current_steps"]: e["lr"] for e in log if "lr" in e}
    assert lr[5] == pytest.approx(5e-4 * (8 - 5) / 8)  # the new peak, on the new linear schedule


def test_a_damaged_checkpoint_is_skipped_for_the_previous_intact_one(uninterrupted, tmp_path):
    config, out = _crashed_run(tmp_path)
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after it was written
    assert "adapter_model.safetensors has 100 of" in ckpt.damage(out / "checkpoint-4")
    proc = _cli(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-4 is damaged (adapter_model.safetensors has 100 of" in proc.stderr
    assert _bitwise(_adapter(out), _adapter(uninterrupted))  # resumed from checkpoint-2: the same run


def test_no_intact_checkpoint_left_is_refused_in_one_line(tmp_path):
    config, out = _crashed_run(tmp_path)
    for path in ckpt.list_checkpoints(out):
        (path / "optimizer.pt").unlink()
    proc = _cli(config, "resume_from_checkpoint=true")
    assert proc.returncode == 2 and _error_lines(proc.stderr) == [
        f"lf-dist: error: resume_from_checkpoint: no intact checkpoint in {out}"
    ]
    proc = _cli(config, f"resume_from_checkpoint={out / 'checkpoint-2'}")
    assert proc.returncode == 2 and "checkpoint-2 is damaged (optimizer.pt is missing)" in proc.stderr


def test_a_full_disk_while_checkpointing_stops_in_one_line_and_keeps_the_earlier_checkpoint(
    tmp_path, monkeypatch, capsys
):
    real, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        calls.append(f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, out, save_strategy="steps", save_steps=2)
    assert main(["train", str(cfg)]) == EXIT_FAILED
    (line,) = _error_lines(capsys.readouterr().err)
    assert "could not write checkpoint-4" in line and "No space left on device" in line
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-2"] and ckpt.damage(out / "checkpoint-2") is None
    assert not list(out.glob(".tmp-*"))


def test_a_failed_final_model_write_stops_in_one_line(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    def refuse(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(PeftModel, "save_pretrained", refuse)
    out = tmp_path / "run"
    assert main(["train", str(_yaml(tmp_path, out))]) == EXIT_FAILED
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"lf-dist: error: could not write the model to {out}") and "Read-only" in line


def test_a_second_run_into_a_held_output_dir_is_refused_and_a_dead_holder_holds_nothing(tmp_path):
    from lf_dist.launchers.lock import output_dir_lock

    out = tmp_path / "run"
    config = _yaml(tmp_path, out)
    with output_dir_lock(out):
        proc = _cli(config)
    assert proc.returncode == 2
    (line,) = _error_lines(proc.stderr)
    assert f"output_dir: {out} is in use by another lf-dist train (pid {os.getpid()}" in line
    assert not out.exists()  # nothing written by the refused run

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from lf_dist.launchers.lock import output_dir_lock\n"
            f"with output_dir_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # a run that dies without cleaning up
    holder.wait()
    proc = _cli(config)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _nan_from(monkeypatch, first: int, last: int = 10**9) -> None:
    """Steps first..last (1-based) get NaN gradients and a NaN loss."""
    from lf_dist.parallel.base import Strategy

    real, seen = Strategy.forward_backward, [0]

    def poisoned(self, model, micro_batches, loss_fn, n_units):
        loss_sum, metrics = real(self, model, micro_batches, loss_fn, n_units)
        seen[0] += 1
        if first <= seen[0] <= last:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            loss_sum = loss_sum * math.nan
        return loss_sum, metrics

    monkeypatch.setattr(Strategy, "forward_backward", poisoned)


def test_non_finite_steps_are_skipped_then_stop_the_run_without_saving(tmp_path, monkeypatch, capsys):
    _nan_from(monkeypatch, 3)
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, out, save_strategy="steps", save_steps=2)
    assert main(["train", str(cfg)]) == EXIT_FAILED
    (line,) = _error_lines(capsys.readouterr().err)
    assert "non-finite loss or gradient norm" in line and "at step(s) 3, 4, 5" in line
    assert "max_nonfinite_steps: 3" in line and "the last good checkpoint is" in line
    # the skipped updates never reached the weights: checkpoint-4 holds step 2's
    assert _bitwise(_adapter(out / "checkpoint-4"), _adapter(out / "checkpoint-2"))
    assert not (out / "adapter_model.safetensors").exists()


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    _nan_from(monkeypatch, 3, 3)
    out = tmp_path / "run"
    assert main(["train", str(_yaml(tmp_path, out))]) == 0
    assert "step 3: non-finite loss nan" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in _adapter(out).values())


def test_the_guard_leaves_fp16_overflow_to_the_loss_scaler():
    from lf_dist.train.guard import RunGuard

    class Strategy:
        is_main, skips_nonfinite_steps = True, False

    guard = RunGuard(Strategy(), max_nonfinite_steps=1, loss_scaling=True)
    guard.check_finite(1, 0.5, math.inf, None)  # an overflow the scaler skipped: not counted
    with pytest.raises(Exception, match="at step"):
        guard.check_finite(2, math.nan, 1.0, None)
    guard = RunGuard(Strategy(), max_nonfinite_steps=5)
    with pytest.raises(Exception, match="at step\\(s\\) 7"):  # a strategy that cannot skip stops at once
        guard.check_finite(7, 0.5, math.nan, None)


# -- distributed -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_agree_to_stop_when_one_is_signalled_and_resume_bitwise(tmp_path):
    from .test_distributed import _config, lf_dist_train

    config = _config(tmp_path, "lora")
    ref, out = tmp_path / "ref", tmp_path / "out"
    lf_dist_train(config, f"output_dir={ref}", "strategy=fsdp2")
    proc = lf_dist_train(
        config,
        f"output_dir={out}",
        "strategy=fsdp2",
        env={"LF_DIST_SIGNAL_AT_STEP": "4", "LF_DIST_SIGNAL_RANK": "1"},
        check=False,
    )
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert _error_lines(proc.stderr)[-1].startswith("lf-dist: preempted: stopped by")
    assert len(list((out / "checkpoint-4" / "dcp").glob("*.distcp"))) == 2  # both ranks stopped at step 4
    lf_dist_train(config, f"output_dir={out}", "strategy=fsdp2", "overwrite_output_dir=false")
    assert _bitwise(_adapter(out), _adapter(ref))


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_rank_once(tmp_path):
    from .test_distributed import _config

    config, out = _config(tmp_path, "lora"), tmp_path / "out"
    env = {
        **os.environ,
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "lf_dist", "train", str(config), f"output_dir={out}", "strategy=ddp", "max_steps=400"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
    )
    log = out / "trainer_log.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and len(log.read_text(encoding="utf-8").splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # as Kubernetes does: to the main process only
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1 and ckpt.damage(found[0]) is None
    assert json.loads((found[0] / "trainer_state.json").read_text(encoding="utf-8"))["reason"] == "preemption"
