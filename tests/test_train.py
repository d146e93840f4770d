"""Training on one process: learning, saved outputs that reload, accumulation parity and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lf_dist.train.checkpoint import list_checkpoints
from lf_dist.worker import run

from .conftest import TINY_MODEL, stage_data


def _log(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


def _losses(out):
    return [e["loss"] for e in _log(out) if "loss" in e]


def _eval_loss_of_saved_model(cfg, out, adapter: bool) -> float:
    """Reload the saved output from disk and recompute the eval loss on the same split."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lf_dist.data import Collator, build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.train.stages import build_loss

    tokenizer = AutoTokenizer.from_pretrained(out)
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    eval_ds = build_datasets(cfg, tokenizer, template, stage_data(cfg)).eval
    if adapter:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    stage, collate = build_loss(cfg), Collator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_ds), 8):
            batch = collate([eval_ds[j] for j in range(i, min(i + 8, len(eval_ds)))])
            loss, _ = stage(model, batch)
            total, tokens = total + float(loss), tokens + stage.num_units(batch)
    return total / tokens


def test_sft_lora_learns_and_saved_adapter_reproduces_eval_loss(make_cfg):
    cfg = make_cfg(
        max_steps=40, learning_rate=5e-3, val_size=0.1, plot_loss=True, eval_strategy="steps", eval_steps=20
    )
    results = run(cfg)
    out = cfg.train.output_dir and __import__("pathlib").Path(cfg.train.output_dir)
    losses = _losses(out)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.8, losses
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "all_results.json",
        "training_loss.png",
        "trainer_log.jsonl",
    ):
        assert (out / f).is_file(), f
    first = _log(out)[0]
    for key in (
        "current_steps",
        "total_steps",
        "loss",
        "lr",
        "epoch",
        "percentage",
        "elapsed_time",
        "remaining_time",
        "num_tokens",
        "tokens_per_second",
    ):
        assert key in first, key
    assert [e["current_steps"] for e in _log(out) if "eval_loss" in e] == [20, 40, 40]
    saved = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert saved["eval_loss"] == pytest.approx(results["eval_loss"])
    assert _eval_loss_of_saved_model(cfg, out, adapter=True) == pytest.approx(results["eval_loss"], abs=1e-5)


def test_full_finetune_saves_a_transformers_model_that_reproduces_eval_loss(make_cfg):
    cfg = make_cfg(finetuning_type="full", max_steps=15, val_size=0.1)
    results = run(cfg)
    out = __import__("pathlib").Path(cfg.train.output_dir)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert _eval_loss_of_saved_model(cfg, out, adapter=False) == pytest.approx(results["eval_loss"], abs=1e-5)
    losses = _losses(out)
    assert losses[-1] < losses[0] - 0.5


def test_freeze_trains_only_the_last_layers(make_cfg):
    cfg = make_cfg(finetuning_type="freeze", freeze_trainable_layers=1, max_steps=3)
    run(cfg)
    before = load_file(TINY_MODEL / "model.safetensors")
    after = load_file(__import__("pathlib").Path(cfg.train.output_dir) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert {k for k in before if k.startswith("model.layers.1.")} == changed


def test_pretraining_stage_learns(make_cfg):
    cfg = make_cfg(
        stage="pt", dataset="pretrain_demo", finetuning_type="full", cutoff_len=64, max_steps=20, learning_rate=3e-3
    )
    run(cfg)
    losses = _losses(__import__("pathlib").Path(cfg.train.output_dir))
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accumulating_four_micro_batches_equals_one_batch_of_four(make_cfg, method):
    """The loss is normalized by the label tokens of the whole step, so 4x1 and 1x4 give the same update."""
    common = {"finetuning_type": method, "max_steps": 3, "disable_gradient_checkpointing": True}
    a = make_cfg("a", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    b = make_cfg("b", per_device_train_batch_size=1, gradient_accumulation_steps=4, **common)
    run(a)
    run(b)
    out_a, out_b = (__import__("pathlib").Path(c.train.output_dir) for c in (a, b))
    assert _losses(out_a) == pytest.approx(_losses(out_b), rel=1e-5)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(out_a / name), load_file(out_b / name)
    base = load_file(TINY_MODEL / "model.safetensors") if method == "full" else None
    for k in wa:
        # fp32 summation order differs between the layouts; Adam's normalization can amplify that to ~1e-6
        # on near-zero gradients, 0.1% of one step's update (lr 1e-3).
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
        if base is not None:
            assert not torch.equal(wa[k], base[k])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resumed_run_matches_uninterrupted_run_bitwise(make_cfg, monkeypatch, method):
    extra = {
        "finetuning_type": method,
        "max_steps": 8,
        "save_steps": 3,
        "lora_dropout": 0.1,
        "gradient_accumulation_steps": 2,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
    }
    ref = make_cfg("ref", **extra)
    run(ref)
    cfg = make_cfg("crash", **extra)
    monkeypatch.setenv("LF_DIST_FAIL_AT_STEP", "5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.delenv("LF_DIST_FAIL_AT_STEP")
    out = __import__("pathlib").Path(cfg.train.output_dir)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    resumed = make_cfg("crash", resume_from_checkpoint=True, **extra)
    run(resumed)
    ref_out = __import__("pathlib").Path(ref.train.output_dir)
    assert _losses(out) == _losses(ref_out)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    w_ref, w_res = load_file(ref_out / name), load_file(out / name)
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k


def test_checkpoints_hold_full_state_and_rotate(make_cfg):
    cfg = make_cfg(max_steps=9, save_steps=2, save_total_limit=2)
    run(cfg)
    out = __import__("pathlib").Path(cfg.train.output_dir)
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["checkpoint-6", "checkpoint-8"]
    files = {p.name for p in kept[-1].iterdir()}
    assert {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "trainer_state.json",
    } <= files
    state = json.loads((kept[-1] / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 8 and state["data_position"]["micro_batch"] == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_incomplete_checkpoint_is_never_resumed_from(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=4, save_steps=2)
    run(cfg)
    out = __import__("pathlib").Path(cfg.train.output_dir)
    (out / "checkpoint-99").mkdir()  # e.g. a crash while writing: no trainer_state.json
    (out / ".tmp-checkpoint-100").mkdir()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


def test_sharegpt_sft_learns(make_cfg):
    cfg = make_cfg(dataset="sharegpt_demo", max_steps=20, learning_rate=5e-3, cutoff_len=256)
    run(cfg)
    losses = _losses(__import__("pathlib").Path(cfg.train.output_dir))
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"use_rslora": True}, {"bf16": True}])
def test_dora_rslora_and_bf16_lower_the_loss_on_every_linear_layer(make_cfg, extra):
    cfg = make_cfg(max_steps=12, learning_rate=5e-3, **extra)
    run(cfg)
    out = __import__("pathlib").Path(cfg.train.output_dir)
    losses = _losses(out)
    assert all(x == x for x in losses) and losses[-1] < losses[0], losses
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["use_dora"] == extra.get("use_dora", False)
    assert adapter["use_rslora"] == extra.get("use_rslora", False)
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_epochs_drive_the_step_count_and_logging_strategy_epoch(make_cfg):
    cfg = make_cfg(
        max_steps=-1, num_train_epochs=2, max_samples=40, per_device_train_batch_size=8, logging_strategy="epoch"
    )
    results = run(cfg)
    out = __import__("pathlib").Path(cfg.train.output_dir)
    assert results["total_steps"] == 10 and results["epoch"] == 2.0
    assert [e["current_steps"] for e in _log(out)] == [5, 10]
