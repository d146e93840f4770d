"""strategy megatron in the planner: its memory model term by term (megatron_memory.py), `lf-dist plan` of a
megatron config, and strategy auto moving a run from FSDP2 to megatron where only tensor and pipeline parallelism
make it fit (and leaving it on FSDP2 where that fits).

Transformer Engine decides megatron's attention (fused, or megatron's own that keeps every head's scores) and
whether sequence parallelism can run; the planner reads it on this machine, so each test pins it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lf_dist.cli import main
from lf_dist.parallel.megatron import runtime
from lf_dist.parallel.megatron.settings import Layout
from lf_dist.planner import load_profile, make_plan, megatron_memory
from lf_dist.planner.memory import GIB, layer_activation_bytes
from lf_dist.planner.sizing import Sizing
from lf_dist.run_checks import load_config
from lf_dist.train.stages import get_stage

from .conftest import ROOT

CONFIGS = ROOT / "examples" / "model-configs"
SFT = ROOT / "examples" / "tiny" / "sft_lora.yaml"
# Llama-3.1-70B: 80 layers of 855,654,400 parameters, hidden 8192, 64 query and 8 KV heads, vocabulary 128,256
LAYERS, LAYER, HIDDEN, VOCAB_ROWS = 80, 855_654_400, 8192, 128_256 * 8192
TOKENS = 16_384


@pytest.fixture(autouse=True)
def without_transformer_engine(monkeypatch):
    monkeypatch.setattr(runtime, "has_transformer_engine", lambda: False)


def _cfg(model: str = "Llama-3.1-70B", **keys):
    values = {
        "model_name_or_path": CONFIGS / model,
        "bf16": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        **keys,
    }
    return load_config(SFT, [f"{k}={v}" for k, v in values.items()])


def _layout(plan) -> tuple[int, int, int]:
    mp = plan.model_parallel if hasattr(plan, "model_parallel") else plan["model_parallel"]
    return mp["tensor_model_parallel_size"], mp["pipeline_model_parallel_size"], mp["data_parallel_size"]


def _plan(model: str, nnodes: int, **keys):
    cfg = _cfg(model, **keys)
    return cfg, make_plan(cfg, load_profile("h100x8", nnodes=nnodes), get_stage("sft"), launching=False)


@pytest.fixture(scope="module")
def sizing():
    """Llama-3.1-70B full fine-tuning on 4 nodes of 8 H100, measured once."""
    cfg = _cfg(finetuning_type="full", cutoff_len=TOKENS)
    hw = load_profile("h100x8", nnodes=4)
    return Sizing(cfg, hw, get_stage("sft"), hw.world_size, 8, "fsdp2", 0, False)


def _terms(p: Sizing, tp, pp, method="full", recompute="full", accumulation=2, **settings) -> dict:
    """megatron's GiB per GPU over TP × PP (the rest of 32 ranks data parallel), no runtime overhead."""
    q = p.with_megatron(Layout(tp, pp, None, 1, 32 // (tp * pp)))
    par = replace(q.parallel, **{"fused": False, "distributed_optimizer": False, **settings})
    setup = replace(p.setup(method, None, bool(recompute), TOKENS, 1), accumulation=accumulation)
    return megatron_memory.estimate(p.size, setup, par.with_recompute(recompute, p.cfg), 0.0)


def test_weights_and_gradients_divide_by_tp_times_pp_with_the_vocabulary_on_an_end_stage(sizing):
    """bf16 weights and fp32 main gradients: the whole model ÷ TP on one stage; with stages, layers/PP ÷ TP plus
    one vocabulary matrix ÷ TP (embeddings on the first stage, the output layer on the last)."""
    whole = _terms(sizing, 1, 1)
    assert whole["weights"] == pytest.approx(2 * 70_553_706_496 / GIB, abs=1e-3)  # 131.42 GiB
    assert whole["gradients"] == pytest.approx(2 * whole["weights"], abs=1e-3)
    for tp in (2, 8):
        assert _terms(sizing, tp, 1)["weights"] == pytest.approx(whole["weights"] / tp, abs=1e-3)
    for tp, pp in ((8, 2), (8, 4), (4, 8)):
        stage = (LAYERS // pp * LAYER + VOCAB_ROWS) / tp
        terms = _terms(sizing, tp, pp)
        assert (terms["weights"], terms["gradients"]) == pytest.approx((2 * stage / GIB, 4 * stage / GIB), abs=1e-3)
    assert _terms(sizing, 8, 4)["weights"] == pytest.approx(4.229, abs=1e-3)
    lora = _terms(sizing, 8, 4, method="lora")
    adapters = sizing.trainable("lora") / 32  # only LoRA's adapters have gradients and optimizer states
    assert lora["gradients"] == pytest.approx(4 * adapters / GIB, abs=1e-3)
    assert lora["optimizer"] == pytest.approx(12 * adapters / GIB, abs=1e-3)


def test_optimizer_states_divide_by_dp_with_the_distributed_optimizer_as_fsdp2_shards_them(sizing):
    """fp32 main parameters and AdamW's two moments, 12 bytes per parameter, ÷ DP with the distributed optimizer:
    at TP 1 × PP 1 over 32 ranks what a rank holds of them equals FSDP2's fp32 weights and moments shard."""
    whole = _terms(sizing, 8, 1)["optimizer"]
    assert whole == pytest.approx(12 * 70_553_706_496 / 8 / GIB, abs=1e-3)
    assert _terms(sizing, 8, 1, distributed_optimizer=True)["optimizer"] == pytest.approx(whole / 4, abs=1e-3)
    flat = sizing.with_megatron(Layout(1, 1, None, 1, 32)).parallel
    assert flat.distributed_optimizer  # on by default on a GPU with DP > 1
    states = megatron_memory.estimate(sizing.size, sizing.setup("full", None, True, TOKENS, 1), flat, 0.0)
    fsdp2 = sizing.memory("full", None, True)
    assert states["optimizer"] == pytest.approx(fsdp2["weights"] + fsdp2["optimizer"], abs=0.01)  # 24.64 GiB
    assert states["optimizer"] == pytest.approx(24.641, abs=1e-3)


def test_activations_divide_by_tp_with_sequence_parallelism_and_keep_the_rest_whole_without_it(sizing):
    """With Transformer Engine's attention (no scores kept): sequence parallelism splits every activation over TP;
    without it the norms, residual stream and linear inputs (memory.py's 24 bytes per hidden value for weights in
    the compute dtype, less the query and attention output: 20) stay whole on each TP rank."""
    te = {"fused": True}
    for recompute in (None, "full"):
        one = _terms(sizing, 1, 1, recompute=recompute, **te)
        sp = _terms(sizing, 8, 1, recompute=recompute, sequence_parallel=True, **te)
        assert sp["activations"] == pytest.approx(one["activations"] / 8, rel=1e-3)
        assert sp["logits"] == pytest.approx(one["logits"] / 8, rel=1e-3)
    lora_setup = replace(sizing.setup("lora", None, False, TOKENS, 1), method="lora")
    replicated = layer_activation_bytes(sizing.size, lora_setup) - 4 * 1024 - 8 * 28_672 - 4 * HIDDEN
    assert replicated == 20 * HIDDEN
    whole = _terms(sizing, 8, 1, recompute=None, **te)["activations"]
    split = _terms(sizing, 8, 1, recompute=None, sequence_parallel=True, **te)["activations"]
    # every layer's replicated share and the embeddings' output (8 bytes per hidden value), 7/8 of them kept twice
    expected = TOKENS * (LAYERS * replicated + 8 * HIDDEN) * 7 / 8 / GIB
    assert whole - split == pytest.approx(expected, abs=2e-3)  # 175.88 GiB


def test_full_recompute_keeps_less_than_selective_which_keeps_less_than_none(sizing):
    """megatron's own attention keeps the fp32 softmax and the probabilities of each of its 64/TP heads per token
    and layer; selective recompute drops that core (one layer's at a time), full keeps each layer's input."""
    totals = {r: _terms(sizing, 8, 1, recompute=r)["total"] for r in (None, "selective", "full")}
    assert totals["full"] < totals["selective"] < totals[None]
    assert (totals[None], totals["selective"], totals["full"]) == pytest.approx((1360.29, 405.52, 197.91), abs=0.01)
    core = ((4 + 2) * 64 * TOKENS + 4 * HIDDEN) / 8 - 4 * 1024 / 8  # bytes per token and layer at TP 8
    none, selective = _terms(sizing, 8, 1, recompute=None), _terms(sizing, 8, 1, recompute="selective")
    # 79 layers' cores more; selective's one recomputed core comes after the logits are freed, in their place
    kept = none["activations"] - selective["activations"]
    assert kept == pytest.approx((LAYERS - 1) * TOKENS * core / GIB + none["logits"], abs=2e-3)


def test_the_first_pipeline_stage_holds_up_to_pp_micro_batches_in_flight(sizing):
    """1F1B: stage 0 runs PP - 1 forwards ahead, so it keeps min(PP, micro-batches) micro-batches' layer inputs
    (full recompute: 1.5 bf16 values per hidden value and layer, with the embeddings' 8 bytes)."""
    acts = {ga: _terms(sizing, 8, 4, accumulation=ga, fused=True)["activations"] for ga in (1, 2, 4, 8)}
    per_micro_batch = TOKENS * (LAYERS // 4 * 1.5 * 2 * HIDDEN + 8 * HIDDEN) / GIB  # 8.5 GiB
    assert acts[4] - acts[2] == pytest.approx(2 * per_micro_batch, abs=2e-3)
    assert acts[8] == acts[4] and acts[1] < acts[2]


def test_lf_dist_plan_of_a_megatron_config_prints_its_layout_and_global_batch(capsys):
    args = [
        str(SFT),
        f"model_name_or_path={CONFIGS / 'Llama-3.1-70B'}",
        "strategy=megatron",
        "tensor_model_parallel_size=8",
        "pipeline_model_parallel_size=2",
        "finetuning_type=full",
        "cutoff_len=4096",
        "bf16=true",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=4",
        "--profile",
        "h100x8",
        "--nnodes",
        "4",
    ]
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: full · megatron TP 8 × PP 2 × CP 1 × DP 2, global batch 8 · torchrun ×32 · ")
    assert "global batch = DP 2 × per_device_train_batch_size 1 × gradient_accumulation_steps 4 = 8 sequences" in out
    assert "strategy megatron: as the config says" in out and "weights 8.21, gradients 16.43, optimizer 24.64" in out
    assert main(["plan", *args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    mp = plan["model_parallel"]
    assert (
        _layout(plan) == (8, 2, 2)
        and mp["use_distributed_optimizer"]
        and mp["global_batch_size"] == 8
        and not mp["chosen_by_plan"]
    )
    # on this machine, without a GPU profile, megatron is refused as the run would be
    assert main(["plan", str(SFT), f"model_name_or_path={CONFIGS / 'Llama-3.1-70B'}", "strategy=megatron"]) == 2
    assert "megatron-core's layers need CUDA GPUs" in capsys.readouterr().err


# (model, nodes of h100x8, keys, FSDP2's GiB, megatron's TP, PP, DP and GiB): the planner's own figures decide
CASES = {
    "Llama-3.1-70B full at 16k on 4 nodes": (
        "Llama-3.1-70B",
        4,
        {"finetuning_type": "full", "cutoff_len": 16384},
        111.00,
        (8, 4, 1, 75.12),
    ),
    "Llama-3.1-405B LoRA at 4k on 2 nodes": (
        "Llama-3.1-405B",
        2,
        {"finetuning_type": "lora", "cutoff_len": 4096},
        91.73,
        (8, 2, 1, 76.72),
    ),
}


# each backend's largest terms, as the reason lines show them
FSDP2_TERMS = {
    "Llama-3.1-70B full at 16k on 4 nodes": "activations 68.32, optimizer 16.43, gathered_layers 8.33, weights 8.21",
    "Llama-3.1-405B LoRA at 4k on 2 nodes": "weights 47.36, activations 26.90, gathered_layers 15.79, runtime 1.00",
}
MEGATRON_TERMS = {
    "Llama-3.1-70B full at 16k on 4 nodes": "activations 32.06, optimizer 25.37, gradients 8.46, weights 4.23",
    "Llama-3.1-405B LoRA at 4k on 2 nodes": "weights 47.28, activations 27.64, runtime 1.00, attention_buffer 0.50",
}


@pytest.mark.parametrize("case", CASES)
def test_strategy_auto_moves_to_megatron_where_only_tensor_and_pipeline_parallelism_fit(case, capsys):
    model, nodes, keys, fsdp2_gib, (tp, pp, dp, gib) = CASES[case]
    cfg, plan = _plan(model, nodes, **keys)
    method = keys["finetuning_type"]
    assert (plan.strategy, plan.finetuning_type, plan.fits, _layout(plan)) == ("megatron", method, True, (tp, pp, dp))
    assert plan.per_gpu_memory_gib == pytest.approx(gib, abs=0.01) and plan.model_parallel["chosen_by_plan"]
    overrides = [f"{k}={v}" for k, v in {"model_name_or_path": CONFIGS / model, "bf16": True, **keys}.items()]
    batch = ["per_device_train_batch_size=1", "gradient_accumulation_steps=2"]
    assert main(["plan", str(SFT), *overrides, *batch, "--profile", "h100x8", "--nnodes", str(nodes)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"plan: {method} · megatron TP {tp} × PP {pp} × CP 1 × DP {dp}, global batch")
    at = next(i for i, line in enumerate(printed) if line.startswith("  - strategy "))
    assert printed[at : at + 3] == [
        f"  - strategy megatron: fsdp2 does not fit {method} on {8 * nodes} GPUs; tensor and pipeline parallelism "
        "split the layers and their activations",
        f"  - fsdp2: {method} needs {fsdp2_gib:.2f} GiB per GPU > 79.19 GiB ({FSDP2_TERMS[case]} GiB)",
        f"  - megatron TP {tp} × PP {pp} × DP {dp}: {method} fits in {gib:.2f} of 79.19 GiB per GPU "
        f"({MEGATRON_TERMS[case]} GiB), the smallest TP × PP that does",
    ]
    run = plan.resolve(cfg)
    t = run.train
    assert (t.strategy, t.tensor_model_parallel_size, t.pipeline_model_parallel_size) == ("megatron", tp, pp)
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "uniform", 1)
    assert not (run.data.packing or run.data.padding_free or run.model.enable_liger_kernel or t.sequence_parallel)


def test_where_fsdp2_fits_it_stays_and_megatron_is_not_priced():
    _, plan = _plan("Llama-3.1-70B", 4, finetuning_type="full", cutoff_len=8192)
    assert (plan.strategy, plan.fits, plan.model_parallel) == ("fsdp2", True, {})
    assert plan.per_gpu_memory_gib == pytest.approx(76.59, abs=0.01)
    assert not any("megatron" in r for r in plan.reasons)


def test_auto_keeps_fsdp2_where_megatron_cannot_train_the_run_and_says_why():
    _, plan = _plan("Llama-3.1-405B", 2, finetuning_type="lora", cutoff_len=4096, use_dora=True)
    assert (plan.strategy, plan.fits) == ("fsdp2", False)
    assert any(
        r.startswith("megatron: not priced: use_dora: not supported with strategy megatron") for r in plan.reasons
    )


def test_with_transformer_engine_auto_turns_on_sequence_parallelism_and_needs_less(monkeypatch):
    """Fused attention keeps no scores and sequence parallelism splits the rest: a smaller layout fits."""
    monkeypatch.setattr(runtime, "has_transformer_engine", lambda: True)
    cfg, plan = _plan("Llama-3.1-70B", 4, finetuning_type="full", cutoff_len=16384)
    mp = plan.model_parallel
    assert (plan.strategy, _layout(plan)) == ("megatron", (8, 2, 2))
    assert mp["sequence_parallel"] and mp["use_distributed_optimizer"] and "attention_buffer" not in plan.memory_gib
    assert plan.per_gpu_memory_gib == pytest.approx(55.10, abs=0.01)
    assert plan.resolve(cfg).train.sequence_parallel


def test_a_megatron_config_that_does_not_fit_is_advised_the_smallest_larger_layout():
    keys = {"finetuning_type": "full", "cutoff_len": 8192, "gradient_accumulation_steps": 4}
    _, plan = _plan("Llama-3.1-70B", 4, strategy="megatron", tensor_model_parallel_size=8, **keys)
    assert not plan.fits and plan.per_gpu_memory_gib == pytest.approx(95.95, abs=0.01)
    assert plan.suggestion == (
        "tensor_model_parallel_size: 8 and pipeline_model_parallel_size: 2 would fit (71.81 GiB per GPU; DP 2)"
    )
    _, advised = _plan("Llama-3.1-70B", 4, strategy="megatron", tensor_model_parallel_size=8,
                       pipeline_model_parallel_size=2, **keys)  # fmt: skip
    assert advised.fits and advised.per_gpu_memory_gib == pytest.approx(71.81, abs=0.01)
