"""The time model (planner/step_time.py): FLOPs and volumes as each method and backend has them, `lf-dist plan`'s
step time, tokens/s and MFU, `--scaling`, and `lf-dist env --calibrate` writing a profile that plans read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lf_dist.cli import main
from lf_dist.planner import load_profile
from lf_dist.planner.profiles import PROFILES
from lf_dist.planner.sizing import Sizing
from lf_dist.planner.step_time import collective_seconds, collectives, flop_terms, flops_per_token, kernel_rates
from lf_dist.run_checks import load_config
from lf_dist.train.stages import get_stage

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = ROOT / "examples" / "model-configs" / "Llama-3.1-8B"
SFT_LORA = ROOT / "examples" / "tiny" / "sft_lora.yaml"


def _sizing(overrides=(), strategy="fsdp2", world=8, per_node=8, profile="h100x8", zero=0):
    cfg = load_config(SFT_LORA, [f"model_name_or_path={LLAMA_8B}", "bf16=true", *overrides])
    return Sizing(cfg, load_profile(profile), get_stage("sft"), world, per_node, strategy, zero, False)


def _setup(p: Sizing, method: str, gc=False, world=None):
    return p.setup(method, None, gc, p.cfg.data.cutoff_len, p.cfg.train.per_device_train_batch_size, world=world)


def test_a_frozen_weight_has_no_weight_gradient_so_lora_costs_two_thirds_of_full():
    p = _sizing()
    full, _ = flops_per_token(p.size, _setup(p, "full"))
    lora, _ = flops_per_token(p.size, _setup(p, "lora"), lora_rank=8)
    linear = 2.0 * sum(r * c for _, r, c in p.size.linear_shapes)  # forward FLOPs of the decoder's weights
    head = 2.0 * p.size.hidden_size * p.size.vocab_size
    assert full == pytest.approx(3 * (linear + head), rel=0.02)  # forward, input and weight gradients
    assert lora == pytest.approx(2 * (linear + head), rel=0.02)  # forward and input gradients only
    assert 8e9 * 6 * 0.9 < full < 8e9 * 6 * 1.1  # the textbook 6·N per token


def test_checkpointing_recomputes_one_forward_and_mfu_leaves_it_out():
    p = _sizing()
    plain, useful = flops_per_token(p.size, _setup(p, "full"))
    recomputed, useful_gc = flops_per_token(p.size, _setup(p, "full", gc=True))
    assert useful_gc == useful and recomputed - plain == pytest.approx(
        plain / 3 - 2 * p.size.hidden_size * p.size.vocab_size, rel=0.02
    )


def test_the_chunked_kernel_recomputes_only_a_trained_output_layers_logits():
    p = _sizing()
    full, lora = _setup(p, "full"), _setup(p, "lora")
    head = 2.0 * p.size.hidden_size * p.size.vocab_size
    kept, recomputed = (flop_terms(p.size, replace(full, recomputed_logits=r)) for r in (False, True))
    assert recomputed.output - kept.output == pytest.approx(head) and recomputed.useful == kept.useful
    # a frozen output layer's backward needs only d hidden, which the forward keeps: nothing to recompute
    assert flop_terms(p.size, replace(lora, recomputed_logits=True), 8) == flop_terms(p.size, lora, 8)


def test_lora_and_attention_run_at_their_own_calibrated_rates():
    hw, matmul = replace(PROFILES["h100x8"], matmul_half_width=24.0), 1e15
    attention, adapter = kernel_rates(hw, matmul, 8, 8)
    assert attention == matmul and adapter == pytest.approx(matmul * 8 / 32)  # rank 8 along the width curve
    measured = replace(hw, adapter_tflops=50.0, attention_tflops=400.0)
    attention, adapter = kernel_rates(measured, matmul, 8, 8)
    assert attention == 400e12 and adapter == pytest.approx(50e12)
    _, rank64 = kernel_rates(measured, matmul, 8, 64)  # measured at rank 8, moved along the curve to rank 64
    assert rank64 == pytest.approx(50e12 * (64 / 88) / (8 / 32))
    cpu = replace(measured, gpu=None, gpus_per_node=0)
    assert kernel_rates(cpu, matmul, 2, 8)[1] == pytest.approx(25e12)  # a CPU's processes share it


def test_each_backend_moves_its_own_volumes():
    p = _sizing(["finetuning_type=full"], world=16)
    s, n = _setup(p, "full"), p.size.num_params
    kinds = {c.kind: c for c in collectives(p.size, s, 16, 2)}  # FSDP2 over two nodes
    m = s.accumulation  # the gathers and reduce-scatters repeat per micro-batch
    assert kinds["all_gather"].bytes == 2 * n and kinds["all_gather"].repeats == 2 * m  # bf16, forward, backward
    assert kinds["reduce_scatter"].bytes == 4 * n and kinds["reduce_scatter"].repeats == m
    assert kinds["all_gather"].nodes == 2
    ddp = {c.kind: c for c in collectives(p.size, replace(s, strategy="ddp"), 16, 2)}
    assert list(ddp) == ["all_reduce"] and ddp["all_reduce"].bytes == 4 * n and ddp["all_reduce"].repeats == 1
    zero2 = {c.kind: c for c in collectives(p.size, replace(s, strategy="deepspeed", zero_stage=2), 16, 2)}
    assert zero2["reduce_scatter"].bytes == 2 * n and zero2["all_gather"].bytes == 2 * n  # bf16 grads, new weights
    hsdp = {c.kind: c for c in collectives(p.size, replace(s, dp=8), 16, 2)}  # fsdp_shard_size 8: shard in a node
    assert hsdp["all_gather"].nodes == 1 and hsdp["all_reduce"].nodes == 2 and hsdp["all_reduce"].bytes == 4 * n / 8
    hw = PROFILES["h100x8"]
    sharded_over_nodes = sum(collective_seconds(c, hw) for c in kinds.values())
    assert sum(collective_seconds(c, hw) for c in hsdp.values()) < sharded_over_nodes


@pytest.fixture
def cli(capsys):
    """`lf-dist ARGS` in this process, as the console script runs it: (exit code, stdout, stderr)."""

    def run(*args) -> subprocess.CompletedProcess:
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_plan_prints_the_step_time_tokens_per_gpu_and_mfu(cli):
    proc = cli("plan", str(SFT_LORA), f"model_name_or_path={LLAMA_8B}", "bf16=true", "--profile", "h100x8")
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if "step time" in ln]
    assert "tokens/s per GPU" in line and "MFU" in line and "overlapped" in line
    plan = json.loads(
        cli(
            "plan", str(SFT_LORA), f"model_name_or_path={LLAMA_8B}", "bf16=true", "--profile", "h100x8", "--json"
        ).stdout
    )
    t = plan["step_time"]
    assert 0.2 < t["mfu"] < 0.75  # rounded to 6 decimals in the JSON:
    assert t["tokens_per_s"] == pytest.approx(t["tokens_per_step"] / t["step_s"], rel=1e-4)


def test_scaling_names_where_communication_dominates_and_advises_hsdp(cli):
    proc = cli(
        "plan",
        str(SFT_LORA),
        f"model_name_or_path={LLAMA_8B}",
        "bf16=true",
        "finetuning_type=full",
        "--profile",
        "h100x8",
        "--scaling",
        "16",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["nodes"] for r in out["scaling"]] == [1, 2, 4, 8, 16]
    dominates, *advice = out["verdict"]
    compute = [r["step_s"] - r["exposed_communication_s"] for r in out["scaling"]]
    first = next(i for i, r in enumerate(out["scaling"]) if r["communication_s"] > compute[i])
    assert first > 0 and dominates.startswith(f"communication dominates from {out['scaling'][first]['nodes']} node")
    assert any("fsdp_shard_size: 8" in line for line in advice)
    assert any("gradient_accumulation_steps" in line for line in advice)
    text = cli("plan", str(SFT_LORA), f"model_name_or_path={LLAMA_8B}", "--profile", "h100x8", "--scaling", "4")
    assert "tokens/s/GPU" in text.stdout and text.stdout.count("\n") > 6


def test_scaling_of_zero_nodes_is_one_line(cli):
    proc = cli("plan", str(SFT_LORA), "--profile", "h100x8", "--scaling", "0")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--scaling" in proc.stderr


def test_named_gpu_profiles_carry_published_peaks_and_bandwidths():
    for profile in PROFILES.values():
        if profile.on_gpu:
            assert profile.peak_bf16_tflops > 100 and profile.peak_fp32_tflops > 10 and profile.memory_gbps > 500
    assert PROFILES["h100x8"].memory_gbps == 3350 and PROFILES["a100-80gbx8"].memory_gbps == 2039


def test_calibrate_writes_a_profile_that_plans_on_this_machine_read(tmp_path):
    """As a user runs it: `lf-dist env --calibrate` with no options writes the user cache, and a plain `lf-dist
    plan` on the same machine then prices time with those rates; `--profile FILE` reads the file anywhere."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = _cli("env", "--calibrate", env=env)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "cache" / "lf_dist" / "calibrated_profile.yaml"
    assert str(path) in proc.stdout
    hw = load_profile(str(path))
    assert hw.peak_fp32_tflops > 0 and hw.memory_gbps > 0 and hw.optimizer_gbps > 0 and hw.op_latency_us > 0
    assert hw.unfused_optimizer_gbps > 0 and hw.attention_tflops > 0 and hw.adapter_tflops > 0
    assert hw.layer_overhead_us >= 0 and hw.lora_layer_overhead_us >= 0
    assert hw.intra_node_gbps > 0 and hw.collective_latency_us > 0  # gloo between two processes
    assert hw.all_gather_gbps > 0 and hw.reduce_scatter_gbps > 0
    plan = json.loads(_cli("plan", str(SFT_LORA), "--json", env=env).stdout)
    assert plan["profile"] == "this machine (calibrated)" and plan["step_time"]["step_s"] > 0
    elsewhere = json.loads(_cli("plan", str(SFT_LORA), "--profile", str(path), "--json").stdout)
    assert elsewhere["step_time"]["step_s"] > 0


def test_megatron_pays_the_pipeline_bubble_and_tp_all_reduces_on_the_critical_path(cli):
    def timing(*overrides):
        args = ["plan", str(SFT_LORA), f"model_name_or_path={LLAMA_8B}", "bf16=true", "strategy=megatron"]
        proc = cli(*args, "finetuning_type=full", *overrides, "--profile", "h100x8", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["step_time"]

    few = timing("pipeline_model_parallel_size=2", "gradient_accumulation_steps=1")
    many = timing("pipeline_model_parallel_size=2", "gradient_accumulation_steps=8")
    # (PP - 1) / micro-batches idle: one micro-batch waits a whole stage, eight wait an eighth of one
    assert few["compute_s"] / few["tokens_per_step"] > 1.7 * many["compute_s"] / many["tokens_per_step"]
    tp = timing("tensor_model_parallel_size=2")
    # DP's gradient all-reduce hides under the backward on GPUs; TP's activations' all-reduces stay exposed
    assert 0 < tp["exposed_communication_s"] < tp["communication_s"]
