"""The seams later backends and stages plug into: a stage is one spec, the strategy owns forward/backward,
log-probs come from one function, mistakes fail before data, fp16 is never silently fp32."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lf_dist.cli import main
from lf_dist.data import SUPERVISED, Collator, build_datasets
from lf_dist.data.templates import get_template
from lf_dist.model.heads import CAUSAL_LM
from lf_dist.parallel import SingleStrategy
from lf_dist.train import stages
from lf_dist.train.losses import CausalLMLoss, metric, model_inputs, one_step
from lf_dist.train.token_logps import label_logps
from lf_dist.worker import run

from .conftest import ROOT, TINY_MODEL, base_overrides

SFT_YAML = ROOT / "examples" / "tiny" / "sft_lora.yaml"


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


class _CountingLoss(CausalLMLoss):
    """A new stage's loss: sft's cross-entropy plus a metric of its own."""

    def loss(self, outputs, batch):
        loss, _ = super().loss(outputs, batch)
        labels = (batch["labels"][:, 1:] != -100).sum()
        return loss, {"toy/label_tokens": metric(labels.float(), batch["input_ids"].size(0))}


def test_a_new_stage_is_one_spec_in_the_registry(make_cfg, monkeypatch):
    """Registering one StageSpec is all it takes: config checks, data, model, loss, metrics and display follow."""
    spec = stages.StageSpec("toy", SUPERVISED, CAUSAL_LM, lambda cfg, frozen: _CountingLoss())
    monkeypatch.setitem(stages.STAGES, "toy", spec)
    cfg = make_cfg("toy", stage="toy", max_steps=8, learning_rate=5e-3, val_size=8)
    results = run(cfg)
    train = [e for e in _log(_out(cfg)) if "loss" in e]
    assert all(e["toy/label_tokens"] > 1 for e in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert results["eval_toy/label_tokens"] > 1 and "eval_loss" in results
    assert not cfg.data.packing  # the spec's packing default applied by the config check


def _out(cfg) -> Path:
    return Path(cfg.train.output_dir)


class _ReversedMicroBatches(SingleStrategy):
    """A backend with its own schedule overrides one method; here it just runs the micro-batches backwards."""

    calls: list[int] = []

    def forward_backward(self, model, micro_batches, loss_fn, n_units):
        self.calls.append(len(micro_batches))
        return super().forward_backward(model, micro_batches[::-1], loss_fn, n_units)


def test_the_loop_hands_each_step_to_the_strategys_forward_backward(make_cfg, monkeypatch):
    import lf_dist.parallel

    common = {"max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    run(reference := make_cfg("default", **common))
    monkeypatch.setattr(lf_dist.parallel, "build_strategy", _ReversedMicroBatches)
    _ReversedMicroBatches.calls = []
    run(custom := make_cfg("custom", **common))
    assert _ReversedMicroBatches.calls == [2, 2, 2, 2]
    ours = [e["loss"] for e in _log(_out(custom)) if "loss" in e]
    theirs = [e["loss"] for e in _log(_out(reference)) if "loss" in e]
    assert ours == pytest.approx(theirs, abs=1e-5)


class _CountingStrategy(SingleStrategy):
    """A new backend: the single-process strategy with a step counter."""

    steps = 0

    def step(self, model, optimizer, max_grad_norm):
        type(self).steps += 1
        return super().step(model, optimizer, max_grad_norm)


def test_a_new_backend_is_one_spec_in_the_registry(make_cfg, monkeypatch):
    """Registering one BackendSpec is all it takes: the config accepts its name, the plan picks it, the worker
    builds it, and it trains to the same losses as the backend it extends."""
    from lf_dist.parallel import registry

    spec = registry.BackendSpec("counting", _CountingStrategy, one_process=True)
    monkeypatch.setitem(registry.BACKENDS, "counting", spec)
    common = {"max_steps": 4, "per_device_train_batch_size": 2}
    run(reference := make_cfg("single", **common))
    _CountingStrategy.steps = 0
    run(counted := make_cfg("counting", strategy="counting", **common))
    assert _CountingStrategy.steps == 4
    plan = json.loads((_out(counted) / "run_plan.json").read_text(encoding="utf-8"))
    assert plan["strategy"] == "counting"
    ours = [e["loss"] for e in _log(_out(counted)) if "loss" in e]
    theirs = [e["loss"] for e in _log(_out(reference)) if "loss" in e]
    assert ours == pytest.approx(theirs, abs=1e-6)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("fused", [True, False], ids=["chunked-linear-ce", "output-layer-then-ce"])
def test_output_layer_sees_only_label_positions_and_log_probs_equal_the_full_logits(make_cfg, fused):
    """Prompt and padding positions cost no logits — no tensor in forward or backward has a vocabulary-wide row
    per position —; log-probs and gradients equal the full-logits path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_cfg(max_samples=8)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    rows = build_datasets(cfg, tokenizer, get_template("chatml", tokenizer, cfg.data), SUPERVISED).train
    batch = Collator(tokenizer.pad_token_id)([rows[i] for i in range(4)])
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    # fused False: what an output layer that is not a plain nn.Linear (adapters, quantized) goes through
    inputs, labels = model_inputs(batch), batch["labels"]
    with _Shapes() as seen:
        logps, mask = label_logps(model, inputs, labels, fused=fused)
        grads = torch.autograd.grad(-logps.sum(), list(model.parameters()))
    n_scored, vocab, hidden = int(mask.sum()), model.config.vocab_size, model.config.hidden_size
    wide = {s for s in seen.shapes if len(s) > 1 and s[-1] == vocab and s != (hidden, vocab)}  # not W.T
    assert wide and max(math.prod(s[:-1]) for s in wide) <= n_scored, wide  # [N, V] at most, N label positions
    assert n_scored < 0.7 * labels.numel()
    full = model(**inputs, use_cache=False).logits.float().log_softmax(-1)[:, :-1]
    expected = full.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    full_grads = torch.autograd.grad(-expected.sum(), list(model.parameters()))
    for g, f in zip(grads, full_grads):
        assert float((g - f).abs().max() / f.abs().max().clamp(min=1e-12)) < 1e-5


def _cli(tmp_path, capsys, **overrides):
    out = tmp_path / "out"
    code = main(["train", str(SFT_YAML), *base_overrides(out, **overrides)])
    return code, capsys.readouterr().err.strip().splitlines(), out


def _broken_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"broken": {"file_name": "broken.json"}}', encoding="utf-8")
    (data / "broken.json").write_text('[{"instruction": "a" "output": 1}]', encoding="utf-8")
    return {"dataset": "broken", "dataset_dir": str(data)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_target": "nope_proj"}, "lora_target: "),
        ({"finetuning_type": "freeze", "freeze_trainable_layers": 99}, "freeze_trainable_layers: "),
        ({"finetuning_type": "freeze", "freeze_trainable_modules": "nope"}, "freeze_trainable_modules: "),
    ],
)
def test_model_setup_mistakes_fail_before_any_data_is_read(tmp_path, capsys, overrides, message):
    """The model is checked on the meta device first: the broken dataset is never reached."""
    code, err, out = _cli(tmp_path, capsys, **_broken_data(tmp_path), **overrides)
    assert code == 2 and err[-1].startswith(f"lf-dist: error: {message}"), err
    assert not any("Traceback" in line for line in err) and not out.exists()


def test_resuming_another_backends_checkpoint_is_refused_before_output_dir_is_touched(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-4" / "dcp").mkdir(parents=True)  # what fsdp2 / ddp write
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}', encoding="utf-8")
    (out / "lf_dist_config.json").write_text("the previous run's config", encoding="utf-8")
    code, err, _ = _cli(tmp_path, capsys, resume_from_checkpoint=True, overwrite_output_dir=False)
    assert code == 2 and "was written by a distributed run" in err[-1], err
    assert (out / "lf_dist_config.json").read_text(encoding="utf-8") == "the previous run's config"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "lf_dist_config.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp2"])
def test_fp16_without_a_gpu_is_refused_in_one_line_never_run_in_fp32(tmp_path, strategy):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(SFT_YAML), *base_overrides(out, fp16=True, strategy=strategy)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "lf-dist: error: fp16: needs a CUDA GPU (loss scaling); use bf16 on CPU"
    )
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp2"])
def test_fp16_computes_in_half_precision_with_loss_scaling_and_tracks_fp32(make_cfg, monkeypatch, strategy):
    from lf_dist.ports import free_port

    def one_process_group():
        if strategy != "single":  # a process group of one, as torchrun would set it up
            env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
            for key, value in {**env, "MASTER_PORT": str(free_port())}.items():
                monkeypatch.setenv(key, value)

    common = {"strategy": strategy, "max_steps": 6, "save_steps": 3, "learning_rate": 1e-3}
    dtypes: set = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output):
            dtypes.add(output.dtype)

    one_process_group()
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run(half := make_cfg("fp16", fp16=True, **common))
    finally:
        handle.remove()
    one_process_group()
    run(full := make_cfg("fp32", **common))
    assert torch.float16 in dtypes
    assert (_out(half) / "checkpoint-3" / "scaler.pt").is_file()
    half_losses = [e["loss"] for e in _log(_out(half)) if "loss" in e]
    full_losses = [e["loss"] for e in _log(_out(full)) if "loss" in e]
    assert half_losses == pytest.approx(full_losses, rel=2e-2)


def test_preference_keys_name_the_losses_the_dpo_stage_implements():
    from lf_dist.config.schema import PREF_LOSSES
    from lf_dist.train.pref_losses import REFERENCE_FREE_LOSSES, REFERENCE_LOSSES

    assert set(PREF_LOSSES) == set(REFERENCE_LOSSES) | set(REFERENCE_FREE_LOSSES)


def _torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    from lf_dist.ports import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, str(script), *args], env=env, capture_output=True, text=True, encoding="utf-8", timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_generation_on_training_weights_keeps_ranks_in_step_when_completions_end_apart(tmp_path, backend):
    """Rank 0's completions stop after 2 tokens, rank 1's after 30: neither waits for the other (the collective
    timeout is 60 s; generation takes seconds), the tokens are the model's own greedy ones, and the next training
    step runs on the same shards on every rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generate_ranks import NEW_TOKENS, PROMPTS

    sharding = (
        {"strategy": "fsdp2"} if backend == "fsdp2" else {"deepspeed": ROOT / "examples/deepspeed/ds_z3_config.json"}
    )
    overrides = base_overrides(tmp_path / "run", ddp_timeout=60, per_device_train_batch_size=2, **sharding)
    _torchrun(Path(__file__).parent / "generate_ranks.py", str(SFT_YAML), str(tmp_path), *overrides)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL, padding_side="left")
    prompts = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)  # LoRA starts as the base
    longest = max(NEW_TOKENS.values())
    alone = model.generate(
        **prompts, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    for rank, record in enumerate(ranks):
        new = len(record["ids"][0]) - record["prompt_len"]
        assert new == NEW_TOKENS[rank], (rank, new)
        assert record["ids"] == alone[:, : record["prompt_len"] + new].tolist()
        assert record["seconds"] < 30, record["seconds"]
    assert math.isfinite(ranks[0]["loss"]) and ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], abs=1e-6)


class _RecordingStrategy(SingleStrategy):
    """Records the columns of every micro-batch the loop hands to forward_backward."""

    columns: list[set] = []

    def forward_backward(self, model, micro_batches, stage_loss, n_units):
        self.columns += [set(b) for b in micro_batches]
        return super().forward_backward(model, micro_batches, stage_loss, n_units)


@pytest.mark.parametrize(
    "stage,dataset,reference", [("dpo", "ranking_demo", "ref_logps"), ("kto", "kto_demo", "ref_kl_logps")]
)
def test_reference_log_probs_prepared_as_columns_leave_the_losses_unchanged(
    make_cfg, monkeypatch, stage, dataset, reference
):
    """The stage's `prepare` computes the reference's log-probs before the step, as batch columns; the losses are
    those of computing them inside the forward (the stage without its prepare), step by step."""
    import lf_dist.parallel

    common = {"stage": stage, "dataset": dataset, "max_steps": 4, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 2, "val_size": 8, "learning_rate": 1e-3}  # fmt: skip
    monkeypatch.setattr(lf_dist.parallel, "build_strategy", _RecordingStrategy)
    _RecordingStrategy.columns = []
    prepared = run(with_prepare := make_cfg("prepared", **common))
    assert _RecordingStrategy.columns and all(reference in c for c in _RecordingStrategy.columns)
    monkeypatch.setitem(stages.STAGES, stage, dataclasses.replace(stages.STAGES[stage], prepare=one_step))
    _RecordingStrategy.columns = []
    inline = run(without := make_cfg("inline", **common))
    assert not any(reference in c for c in _RecordingStrategy.columns)
    ours = [e["loss"] for e in _log(_out(with_prepare)) if "loss" in e]
    theirs = [e["loss"] for e in _log(_out(without)) if "loss" in e]
    assert len(ours) == 4 and ours == pytest.approx(theirs, abs=1e-6)
    assert prepared["eval_loss"] == pytest.approx(inline["eval_loss"], abs=1e-6)


def test_planning_returns_a_new_frozen_config_that_nothing_writes_after_launch(make_cfg):
    """Validation and planning fill copies; the resolved config refuses assignment, and a whole run (train, eval,
    checkpoint, export) reads it without writing."""
    from lf_dist.planner import detect, make_plan

    cfg = make_cfg(max_steps=2, save_steps=1, val_size=8)
    resolved = make_plan(cfg, detect(), stages.get_stage("sft")).resolve(cfg)
    assert resolved is not cfg and resolved.frozen and not cfg.frozen
    assert cfg.train.strategy == "auto" and resolved.train.strategy == "single"
    for section, key, value in (
        ("train", "learning_rate", 1.0),
        ("data", "packing", True),
        ("model", "flash_attn", "sdpa"),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(resolved, section), key, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.train = cfg.train
    before = cfg.to_dict()
    results = run(resolved)  # run resolves it again from its own plan: a frozen config all the way through
    assert results["total_steps"] == 2 and cfg.to_dict() == before


def test_a_model_that_post_processes_its_logits_keeps_its_own_forward():
    """Gemma-2 soft-caps its logits after the output layer: the first scoring call finds out (one forward of two
    tokens), and the log-probs are those of the model's own, soft-capped logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from lf_dist.train.token_logps import VERDICT

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, final_logit_softcapping=0.1, attn_implementation="eager",
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).float()
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    logps, mask = label_logps(model, {"input_ids": ids}, labels)
    assert model.__dict__[VERDICT] is False
    full = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[:, :-1]
    expected = full.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    uncapped = model.lm_head(model.model(input_ids=ids).last_hidden_state).float().log_softmax(-1)[:, :-1]
    assert (
        uncapped.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask] - expected
    ).abs().max() > 0.1


def test_a_plain_model_is_scored_by_the_explicit_forward():
    from transformers import AutoModelForCausalLM

    from lf_dist.train.token_logps import VERDICT

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    ids = torch.randint(0, 100, (1, 8))
    label_logps(model, {"input_ids": ids}, ids)
    assert (
        model.__dict__[VERDICT] is True and "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    )
