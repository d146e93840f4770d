"""strategy megatron's keys and refusals: LLaMA-Factory's switches select it, its keys are never silently ignored,
and what a run cannot do ends in one line (exit 2) before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lf_dist.errors import UserError
from lf_dist.parallel import registry
from lf_dist.parallel.megatron import runtime, settings
from lf_dist.planner.model_size import read_model_config
from tests.conftest import ROOT, TINY_MODEL


@pytest.fixture
def on_cuda(monkeypatch):
    """As on a GPU machine: megatron's layers have a device (the refusals past that one are what is tested)."""
    monkeypatch.setattr(runtime, "device", lambda: torch.device("cpu"))


def _choose(cfg, world: int):
    from lf_dist.train.stages import get_stage

    model_config = read_model_config(cfg.model.model_name_or_path)
    return registry.choose(cfg, world, get_stage(cfg.finetuning.stage), model_config)


def test_use_mca_and_the_environment_switches_select_megatron(make_cfg, monkeypatch, on_cuda):
    assert _choose(make_cfg("a", use_mca=True), 2)[0].name == "megatron"
    assert _choose(make_cfg("b", use_megatron_bridge=True), 2)[0].name == "megatron"
    for name in ("USE_MCA", "USE_MEGATRON_BRIDGE"):
        monkeypatch.setenv(name, "1")
        spec, why = _choose(make_cfg(name), 2)
        assert spec.name == "megatron" and f"{name}=1" in why
        monkeypatch.delenv(name)
    assert _choose(make_cfg("c"), 2)[0].name == "fsdp2"


def test_megatron_keys_with_another_strategy_are_refused(make_cfg, monkeypatch):
    with pytest.raises(UserError, match="tensor_model_parallel_size: read by strategy megatron only"):
        registry.check_config(make_cfg("a", tensor_model_parallel_size=2, strategy="fsdp2"))
    with pytest.raises(UserError, match="tensor_model_parallel_size: read by strategy megatron only"):
        registry.check_config(make_cfg("b", tensor_model_parallel_size=2))
    with pytest.raises(UserError, match="use_mca: true selects strategy megatron, but strategy is 'fsdp2'"):
        registry.check_config(make_cfg("c", use_mca=True, strategy="fsdp2"))
    registry.check_config(make_cfg("d", tensor_model_parallel_size=2, use_mca=True))
    monkeypatch.setenv("USE_MCA", "1")
    registry.check_config(make_cfg("e", pipeline_model_parallel_size=2))


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"recompute_granularity": "some"}, "recompute_granularity: 'some' is not one of full, selective"),
        ({"recompute_granularity": "full"}, "recompute_granularity: full needs recompute_method"),
        ({"recompute_method": "uniform"}, "recompute_method / recompute_num_layers: apply to recompute_granularity"),
        ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size: must be > 0"),
        ({"virtual_pipeline_model_parallel_size": 2}, "virtual_pipeline_model_parallel_size: interleaves"),
    ],
)
def test_bad_megatron_values_are_refused_when_the_config_is_read(make_cfg, keys, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        make_cfg("x", strategy="megatron", **keys)


def test_without_cuda_strategy_megatron_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(ROOT / "examples/tiny/sft_full.yaml"), "use_mca=true"]
        + [f"output_dir={tmp_path / 'o'}"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "lf-dist: error: strategy megatron: megatron-core's layers need CUDA GPUs and this machine has none; use "
        "strategy fsdp2 (or deepspeed) here"
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "world,keys,message",
    [
        (3, {"tensor_model_parallel_size": 2}, "= 2 must divide the world size 3"),
        (
            2,
            {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
            "gradient_accumulation_steps 1: megatron-core's interleaved pipeline",
        ),
        (
            8,
            {"tensor_model_parallel_size": 8},
            "num_attention_heads=4 is not divisible by tensor_model_parallel_size=8",
        ),
        (4, {"pipeline_model_parallel_size": 4}, "layers"),
        (2, {"sequence_parallel": True, "tensor_model_parallel_size": 2}, "sequence_parallel: strategy megatron runs"),
        (2, {"context_parallel_size": 2}, "context_parallel_size: strategy megatron runs it on Transformer Engine"),
        (1, {"packing": True}, "packing: strategy megatron runs it on Transformer Engine"),
        (2, {"use_distributed_optimizer": True}, "use_distributed_optimizer: megatron-core's distributed optimizer"),
        (1, {"stage": "dpo", "dataset": "dpo_en_demo"}, "stage dpo: strategy megatron trains stages pt and sft"),
        (1, {"finetuning_type": "freeze"}, "finetuning_type freeze: strategy megatron trains full or lora"),
        (1, {"fp16": True}, "fp16: strategy megatron trains in bf16 or fp32"),
        (1, {"finetuning_type": "lora", "lora_target": "q_proj,v_proj"}, "linear_qkv"),
    ],
)
def test_what_megatron_cannot_run_is_refused_before_launch(make_cfg, on_cuda, world, keys, message):
    cfg = make_cfg("x", strategy="megatron", **{"finetuning_type": "full", **keys})
    with pytest.raises(UserError, match=message):
        _choose(cfg, world)


def test_kv_heads_and_tp_follow_megatron_core(make_cfg, on_cuda):
    """megatron-core splits query groups over TP ranks or replicates them: their number must divide TP's size or
    be a multiple of it. The tiny model's 2 KV heads run at TP 4 (each rank gathers the fused QKV output); 3 KV
    heads at TP 2 cannot."""
    import copy

    cfg = make_cfg("x", strategy="megatron", finetuning_type="full", tensor_model_parallel_size=4)
    model = read_model_config(str(TINY_MODEL))
    assert (model.num_attention_heads, model.num_key_value_heads) == (4, 2)
    assert settings.refusal(cfg, 4, None, model) is None
    odd = copy.deepcopy(model)
    odd.num_attention_heads, odd.num_key_value_heads, odd.head_dim = 6, 3, 16
    cfg2 = make_cfg("y", strategy="megatron", finetuning_type="full", tensor_model_parallel_size=2)
    problem = settings.refusal(cfg2, 2, None, odd)
    assert problem is not None and "num_key_value_heads=3" in problem and "tensor_model_parallel_size" in problem


def test_the_global_batch_is_stated_with_the_layout(make_cfg):
    cfg = make_cfg(
        "x",
        strategy="megatron",
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
    )
    layout = settings.Layout.of(cfg, 16)
    assert (layout.tp, layout.pp, layout.dp) == (2, 2, 4)
    text = layout.describe(cfg)
    assert "16 rank(s) = TP 2 × PP 2 × CP 1 × DP 4" in text
    assert "= 128 sequences per step" in text and "16 × 4 × 8" in text


def test_a_lora_target_that_splits_a_fused_layer_names_the_groups():
    from lf_dist.parallel.megatron.lora import megatron_lora_targets

    assert megatron_lora_targets("all") == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    with pytest.raises(UserError, match="q_proj,k_proj,v_proj"):
        megatron_lora_targets("q_proj,v_proj")
    with pytest.raises(UserError, match="gate_proj,up_proj"):
        megatron_lora_targets("gate_proj,down_proj")
