"""benchmarks/bench_grpo.py on a GPU: a Qwen2.5-0.5B-shaped model (random weights, bf16), LoRA and full, G=8, 256
new tokens, lf-dist beside TRL's GRPOTrainer on the same card; step times, tokens/s and peak memory (lf-dist's
against its plan) are printed as the benchmark's JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_grpo.py"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_grpo import make_qwen

    return make_qwen(tmp_path_factory.mktemp("qwen") / "model")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_benchmark_on_a_qwen_sized_model(qwen, method):
    """8 prompts x 8 completions per step, micro-batches of 32, 3 steps (the first dropped), one round."""
    cmd = [sys.executable, str(BENCH), "--model", str(qwen), "--method", method, "--bf16", "--rounds", "1"]
    cmd += ["--prompts", "8", "--generations", "8", "--max-new-tokens", "256", "--steps", "3", "--micro-batch", "32"]
    proc = subprocess.run(cmd + ["--threads", "0"], capture_output=True, text=True, encoding="utf-8", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    runs, summary = {x["side"]: x for x in lines if "side" in x}, lines[-1]
    lf, trl = runs["lf-dist"], runs["trl"]
    assert lf["prompt_tokens_per_step"] == trl["prompt_tokens_per_step"]  # the same prompts, the same template
    assert lf["generated_tokens_per_step"] == pytest.approx(trl["generated_tokens_per_step"], rel=0.1)
    assert summary["compare"] == "lf-dist/trl" and summary["step_ratio"] > 0
    assert trl["peak_memory_gb"] > 0
    peak, planned = lf["all_results"]["peak_memory_gb"], lf["all_results"]["planned_peak_memory_gb"]
    print(f"{method}: lf-dist peak {peak} GiB, planned {planned} GiB; TRL peak {trl['peak_memory_gb']} GiB")
    assert peak <= planned * 1.1, f"the plan ({planned} GiB) is below the measured peak ({peak} GiB)"
