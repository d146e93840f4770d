"""strategy megatron trains what the single-process Hugging Face model trains: one step's loss and gradients at
PP=2 (4 micro-batches), TP2×PP2 and DP=2 with unequal token counts per rank and micro-batch, equal the HF model's
(rel. 1e-5, fp32); whole runs through the worker match the single-process run, and a checkpoint saved at TP=2
resumes at TP=1. megatron-core runs on CPU through tests/megatron_shim.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama
from tests.megatron_run import grads_scenario, spawn, train_scenario

IGNORE = -100


def _micro_batch(gen: torch.Generator, rows: int, length: int, vocab: int) -> dict:
    """Right-padded rows of random tokens; each row's prompt (no labels) and length differ, so token counts differ
    by row, micro-batch and rank."""
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for r in range(rows):
        real = int(torch.randint(length // 2, length + 1, (1,), generator=gen))
        prompt = int(torch.randint(1, real // 2 + 1, (1,), generator=gen))
        ids[r, real:], mask[r, real:], labels[r, real:] = 0, 0, IGNORE
        labels[r, :prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(dp: int, per_rank: int, seed: int = 0, vocab: int = 1168) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    return [[_micro_batch(gen, 2, 12 + 3 * i + r, vocab) for i in range(per_rank)] for r in range(dp)]


def _reference(model_dir: Path, batches: list[list[dict]]) -> tuple[float, dict, float]:
    """The single-process HF model's loss per label token, gradients and gradient norm over the same batches."""
    from transformers import AutoModelForCausalLM

    from lf_dist.train.losses import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss_fn = CausalLMLoss()
    flat = [b for rank in batches for b in rank]
    n = sum(loss_fn.num_units(b) for b in flat)
    total = sum(loss_fn(model, b)[0] for b in flat) / n
    total.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    return float(total), grads, norm


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = want.abs().max().clamp_min(1e-12)
    err = float((got.float() - want.float()).abs().max() / scale)
    assert err <= rel, f"{name}: max error {err:.2e} of its largest value (> {rel:.0e})"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    # GQA (4 query heads, 2 KV heads) and 4 layers, so that two pipeline stages hold two each
    return make_llama(tmp_path_factory.mktemp("megatron") / "llama", hidden=256, layers=4, intermediate=256)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,pp,dp,per_rank,vpp",
    [(1, 2, 1, 4, None), (2, 2, 1, 2, None), (1, 1, 2, 2, None), (2, 1, 1, 2, None), (1, 2, 1, 4, 2)],
    ids=["pp2-4-microbatches", "tp2xpp2", "dp2-unequal-tokens", "tp2", "pp2-interleaved-vpp2"],
)
def test_one_step_loss_and_gradients_equal_the_hf_model(tmp_path, llama, tp, pp, dp, per_rank, vpp):
    batches = _batches(dp, per_rank)
    keys = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    if vpp:
        keys.update(virtual_pipeline_model_parallel_size=vpp, gradient_accumulation_steps=per_rank)
    spawn(grads_scenario, tp * pp * dp, str(tmp_path), str(llama), batches, keys)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    loss, grads, norm = _reference(llama, batches)
    assert abs(result["loss"] - loss) <= 1e-5 * abs(loss)
    assert set(result["grads"]) == set(grads)
    for name, want in grads.items():
        _assert_close(name, result["grads"][name], want)
    assert result["norm"] == pytest.approx(norm, rel=1e-5)


def _losses(out: Path, key: str = "loss") -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


@pytest.mark.slow
def test_a_run_at_tp2_matches_one_process_and_resumes_at_tp1_and_pp2(tmp_path, llama):
    """Four sft steps at TP=2 equal the single-process run's losses; the checkpoint of step 2, resumed at TP=1 and
    at PP=2 (megatron-core reshards it), continues from its weights; the exported model is the single run's."""
    from lf_dist.run_checks import load_config
    from lf_dist.worker import run
    from tests.conftest import base_overrides

    common = {"finetuning_type": "full", "max_steps": 4, "save_steps": 2, "learning_rate": 1e-4}
    common.update(val_size=0.1, eval_strategy="steps", eval_steps=2)  # evaluation through the schedule too
    single = tmp_path / "single"
    run(load_config(None, base_overrides(single, model_name_or_path=str(llama), strategy="single", **common)))
    tp2 = tmp_path / "tp2"
    spawn(train_scenario, 2, {**common, "tensor_model_parallel_size": 2}, str(tp2), str(llama))
    want = _losses(single)
    assert len(want) == 4
    assert _losses(tp2) == pytest.approx(want, rel=1e-4)
    assert _losses(tp2, "eval_loss") == pytest.approx(_losses(single, "eval_loss"), rel=1e-4)
    assert len(_losses(single, "eval_loss")) >= 2
    # resumed with half the learning rate: step 3's loss is that of the checkpoint's weights (a run started over
    # at this rate would have other weights by then)
    resume = {**common, "learning_rate": 5e-5, "resume_from_checkpoint": str(tp2 / "checkpoint-2")}
    for name, world, layout in (("tp1", 1, {}), ("pp2", 2, {"pipeline_model_parallel_size": 2})):
        spawn(train_scenario, world, {**resume, **layout}, str(tmp_path / name), str(llama))
        rows = (tmp_path / name / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
        step3 = [json.loads(line)["loss"] for line in rows if json.loads(line).get("current_steps") == 3]
        assert step3 == pytest.approx([want[2]], rel=1e-4), name
    # the exported model is the single-process run's (Adam's steps of at most ~lr where gradients are ~0 aside)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tp2, dtype=torch.float32).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32).state_dict()
    assert set(exported) == set(reference)
    for name, want in reference.items():
        assert float((exported[name] - want).abs().max()) <= 4 * common["learning_rate"], name


@pytest.mark.slow
def test_pt_at_pp2_matches_one_process(tmp_path, llama):
    """Stage pt (rows unpacked: megatron packs on Transformer Engine only) over two pipeline stages, evaluation
    included."""
    from lf_dist.run_checks import load_config
    from lf_dist.worker import run
    from tests.conftest import base_overrides

    common = {"stage": "pt", "dataset": "pretrain_demo", "packing": False, "finetuning_type": "full", "max_steps": 3}
    common.update(val_size=0.1, eval_strategy="steps", eval_steps=2)  # evaluation over the pipeline
    single = tmp_path / "single"
    run(load_config(None, base_overrides(single, model_name_or_path=str(llama), strategy="single", **common)))
    spawn(train_scenario, 2, {**common, "pipeline_model_parallel_size": 2}, str(tmp_path / "pp2"), str(llama))
    assert _losses(tmp_path / "pp2") == pytest.approx(_losses(single), rel=1e-4)
    assert _losses(tmp_path / "pp2", "eval_loss") == pytest.approx(_losses(single, "eval_loss"), rel=1e-4)
    assert _losses(single, "eval_loss")


@pytest.mark.slow
def test_a_lora_run_at_tp2_learns_exports_a_peft_adapter_and_goes_on_from_it(tmp_path, llama):
    """LoRA on megatron's parallel linears: step 1 (B = 0) is the base model's loss, as peft's; the loss falls; the
    adapter loads into peft on the Hugging Face model; its checkpoint (adapters only) resumes at TP=1, and a run
    started from it (adapter_name_or_path) starts from peft's loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lf_dist.run_checks import load_config
    from lf_dist.worker import run
    from tests.conftest import base_overrides

    common = {"finetuning_type": "lora", "lora_target": "all", "max_steps": 8, "save_steps": 4}
    single = tmp_path / "single"
    run(load_config(None, base_overrides(single, model_name_or_path=str(llama), strategy="single", **common)))
    tp2 = tmp_path / "tp2"
    spawn(train_scenario, 2, {**common, "tensor_model_parallel_size": 2}, str(tp2), str(llama))
    losses = _losses(tp2)
    assert losses[0] == pytest.approx(_losses(single)[0], rel=1e-5)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), tp2)
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(b) == 7 * 4 and all(float(p.abs().max()) > 0 for p in b)
    resumed = tmp_path / "resumed"
    resume = {**common, "learning_rate": 5e-4, "resume_from_checkpoint": str(tp2 / "checkpoint-4")}
    spawn(train_scenario, 1, resume, str(resumed), str(llama))
    rows = [json.loads(line) for line in (resumed / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["loss"] for r in rows if r.get("current_steps") == 5] == pytest.approx([losses[4]], rel=1e-4)
    # training goes on from the exported adapter (adapter_name_or_path): megatron and peft start from one loss
    more = {**common, "max_steps": 1, "adapter_name_or_path": str(tp2)}
    run(load_config(None, base_overrides(tmp_path / "peft", model_name_or_path=str(llama), strategy="single", **more)))
    spawn(train_scenario, 2, {**more, "tensor_model_parallel_size": 2}, str(tmp_path / "more"), str(llama))
    assert _losses(tmp_path / "more") == pytest.approx(_losses(tmp_path / "peft"), rel=1e-5)
    assert _losses(tmp_path / "more")[0] < losses[0] - 0.5


@pytest.mark.slow
def test_a_step_with_a_nonfinite_gradient_norm_is_skipped(tmp_path, llama):
    """lf-dist's non-finite guard on megatron-core's optimizer: the NaN step reports a NaN norm (the loop counts it
    towards max_nonfinite_steps) and changes no weight; the next step does."""
    import math

    from tests.megatron_run import nonfinite_scenario

    spawn(nonfinite_scenario, 1, str(tmp_path), str(llama), _batches(1, 1)[0][0])
    (nan_norm, nan_moved), (norm, moved) = torch.load(tmp_path / "result.pt", weights_only=False)
    assert math.isnan(nan_norm) and not nan_moved
    assert math.isfinite(norm) and norm > 0 and moved
