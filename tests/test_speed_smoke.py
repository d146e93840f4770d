"""The speed tooling runs end to end on CPU: the GPU throughput benchmark's tiny config (CI smoke test), the LoRA
forward benchmark, and a compiled training run, which learns exactly like the eager one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_throughput_benchmark_runs_every_variant_on_a_tiny_config():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke"]
    out = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=True, timeout=600).stdout
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert lines[0]["measured_bf16_flops"] > 0
    runs = {x["variant"]: x for x in lines[1:]}
    assert set(runs) == {"hf_loop", "lf-dist", "+liger", "+varlen", "+compile", "megatron"}
    assert "need CUDA" in runs["+liger"]["skipped"] and "need CUDA" in runs["megatron"]["skipped"]
    for name in ("hf_loop", "lf-dist", "+varlen", "+compile"):
        assert runs[name]["tokens_per_s"] > 0 and 0 < runs[name]["mfu_measured_peak"] < 1


def test_lora_forward_benchmark_times_both_forwards_on_the_same_step_and_loss():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--config", "sft_lora", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=True, timeout=600).stdout
    lines = [json.loads(x) for x in out.splitlines()]  # JSON lines only
    assert [x.get("side") for x in lines[:2]] == ["peft", "lean"]
    assert all(x["median_step_s"] > 0 for x in lines[:2])
    assert lines[2]["median_ratio"] > 0 and lines[2]["loss_rel_diff"] < 1e-6


def test_a_compiled_run_logs_the_losses_of_the_eager_run(make_cfg):
    from lf_dist.worker import run

    def losses(name, **keys):
        cfg = make_cfg(name, max_steps=4, **keys)
        run(cfg)
        log = (ROOT / cfg.train.output_dir / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(x)["loss"] for x in log if '"loss"' in x]

    eager, compiled = losses("eager"), losses("compiled", torch_compile=True)
    assert len(eager) == 4 and compiled == pytest.approx(eager, abs=1e-4)
