"""ppo's reward model: every source a reward model comes in loads and scores as its own loader scores it, builds
the same architecture on the meta device, and a reward model that cannot score is refused in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lf_dist.errors import UserError
from lf_dist.model.heads import SEQUENCE_SCORE, VALUE_HEAD_FILE, find_module
from lf_dist.model.loader import load_tokenizer
from lf_dist.train.reward_model import build_reward_model, check_reward_model, reward_scores

from .conftest import ROOT, TINY_MODEL, base_overrides, make_llama, stage_data

HIDDEN = 96  # the tiny model's


@pytest.fixture(scope="module")
def rm_lora(tmp_path_factory) -> Path:
    """An lf-dist rm LoRA (SEQ_CLS adapter with its score layer) trained 4 steps by the CLI, checkpoint-2 on the
    way."""
    out = tmp_path_factory.mktemp("rm") / "lora"
    args = ["max_steps=4", "save_steps=2", f"output_dir={out}", "val_size=0", "eval_strategy=no", "max_samples=32"]
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", "examples/tiny/rm_lora.yaml", *args, "plot_loss=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2" / "adapter_config.json").is_file()
    return out


def _save_value_head(folder: Path, hidden: int = HIDDEN, seed: int = 0) -> dict:
    """A random value head in LLaMA-Factory's file (TRL's names)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {"v_head.summary.weight": torch.randn(1, hidden, generator=gen), "v_head.summary.bias": torch.randn(1)}
    save_file(state, folder / VALUE_HEAD_FILE)
    return state


@pytest.fixture(scope="module")
def llama_factory(tmp_path_factory) -> dict:
    """LLaMA-Factory rm outputs: the whole causal LM, and a CAUSAL_LM LoRA adapter, each with a value head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llama_factory")
    full = root / "full"
    AutoModelForCausalLM.from_pretrained(TINY_MODEL).save_pretrained(full)
    torch.manual_seed(0)  # init_lora_weights=False: both LoRA matrices random, so the adapter changes the model
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", init_lora_weights=False)
    lora = root / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_MODEL), config).save_pretrained(lora)
    return {"full": (full, _save_value_head(full, seed=1)), "lora": (lora, _save_value_head(lora, seed=2))}


@pytest.fixture(scope="module")
def ranking(tmp_path_factory) -> tuple[dict, torch.Tensor]:
    """Chosen and rejected answers of the ranking demo data, right-padded rows, and each row's last token."""
    from lf_dist.data import build_datasets
    from lf_dist.data.collator import PairwiseCollator
    from lf_dist.data.templates import get_template
    from lf_dist.run_checks import load_config

    out = tmp_path_factory.mktemp("ranking")
    cfg = load_config(None, base_overrides(out, stage="rm", dataset="ranking_demo", max_samples=6, cutoff_len=96))
    tokenizer = load_tokenizer(cfg)
    rows = build_datasets(cfg, tokenizer, get_template("chatml", tokenizer, cfg.data), stage_data(cfg)).train
    batch = PairwiseCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    length = batch["input_ids"].shape[1]
    last = batch["ends"] % length
    assert len(set(last.tolist())) > 1  # rows of several lengths: padding after the real tokens
    return batch, last


def _policy(make_cfg, **finetuning):
    cfg = make_cfg("policy")
    return cfg.replace(finetuning=finetuning), load_tokenizer(cfg)


def _seq_cls_reference(model, batch: dict) -> torch.Tensor:
    """A SEQ_CLS model's score at each sequence's last token, as stage rm reads it."""
    from lf_dist.train.preference import RewardLoss

    with torch.no_grad():
        return RewardLoss().scores(model, batch).float()


@pytest.mark.parametrize("source", ["output", "checkpoint-2"])
def test_lf_dist_rm_lora_and_its_checkpoint_score_as_load_weights_loads_them(make_cfg, rm_lora, ranking, source):
    from lf_dist.serve.weights import load_weights

    folder = rm_lora if source == "output" else rm_lora / "checkpoint-2"
    cfg, tokenizer = _policy(make_cfg, reward_model=str(folder), reward_model_type="lora")
    batch, last = ranking
    model = build_reward_model(cfg, tokenizer, torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config")  # merged: a plain transformers model
    scores = reward_scores(model, batch["input_ids"], last)

    reference_cfg = cfg.replace(model={"adapter_name_or_path": str(folder)})
    reference, head = load_weights(reference_cfg, tokenizer, torch.float32, torch.device("cpu"), merge=True)
    assert head is SEQUENCE_SCORE
    expected = _seq_cls_reference(reference, batch)
    assert scores.dtype == torch.float32 and scores.shape == expected.shape
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 0  # the rows score differently: not a constant head


def test_output_and_checkpoint_are_different_reward_models(make_cfg, rm_lora, ranking):
    batch, last = ranking
    scores = []
    for folder in (rm_lora, rm_lora / "checkpoint-2"):
        cfg, tokenizer = _policy(make_cfg, reward_model=str(folder))
        scores.append(reward_scores(build_reward_model(cfg, tokenizer, torch.float32), batch["input_ids"], last))
    assert (scores[0] - scores[1]).abs().max() > 1e-4  # two more steps of training are seen


def test_whole_sequence_classification_folder_scores_as_transformers_loads_it(make_cfg, ranking, tmp_path):
    """A full rm output (a *ForSequenceClassification folder), which no adapter's task type announces."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "full_rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1, pad_token_id=0).save_pretrained(
        folder
    )
    cfg, tokenizer = _policy(make_cfg, reward_model=str(folder), reward_model_type="full", finetuning_type="full")
    batch, last = ranking
    scores = reward_scores(build_reward_model(cfg, tokenizer, torch.float32), batch["input_ids"], last)
    expected = _seq_cls_reference(AutoModelForSequenceClassification.from_pretrained(folder).eval(), batch)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_llama_factory_reward_model_scores_its_value_head_on_the_last_hidden_state(
    make_cfg, llama_factory, ranking, kind
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, v_head = llama_factory[kind]
    cfg, tokenizer = _policy(make_cfg, reward_model=str(folder), reward_model_type=kind)
    batch, last = ranking
    model = build_reward_model(cfg, tokenizer, torch.float32)
    assert find_module(model, "v_head") is not None and find_module(model, "score") is None
    scores = reward_scores(model, batch["input_ids"], last)

    if kind == "full":
        lm = AutoModelForCausalLM.from_pretrained(folder)
    else:
        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), folder).get_base_model()
    with torch.no_grad():
        hidden = lm.eval().model(input_ids=batch["input_ids"]).last_hidden_state
    rows = torch.arange(len(last))
    expected = hidden[rows, last] @ v_head["v_head.summary.weight"][0] + v_head["v_head.summary.bias"]
    # lf-dist merges a LoRA adapter into the weights, peft's reference applies it beside them: fp32 rounds the two
    # differently (1.2e-5 apart on an AMD EPYC build machine)
    tolerance = 5e-5 if kind == "lora" else 1e-5
    torch.testing.assert_close(scores, expected, atol=tolerance, rtol=1e-5)
    if kind == "lora":  # the adapter is merged in: the base's hidden states give other scores
        with torch.no_grad():
            plain = AutoModelForCausalLM.from_pretrained(TINY_MODEL).model(input_ids=batch["input_ids"])
        base = plain.last_hidden_state[rows, last] @ v_head["v_head.summary.weight"][0] + v_head["v_head.summary.bias"]
        assert (base - scores).abs().max() > 1e-3


@pytest.mark.parametrize("source", ["lf_dist_lora", "llama_factory_full"])
def test_meta_build_has_the_loaded_models_parameters_and_no_name_or_path(make_cfg, rm_lora, llama_factory, source):
    if source == "lf_dist_lora":
        cfg, tokenizer = _policy(make_cfg, reward_model=str(rm_lora))
    else:
        cfg, tokenizer = _policy(make_cfg, reward_model=str(llama_factory["full"][0]), reward_model_type="full")
    loaded = build_reward_model(cfg, tokenizer, torch.bfloat16)
    meta = build_reward_model(cfg, tokenizer, torch.bfloat16, meta=True)

    def layout(model):
        return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]

    assert layout(meta) == layout(loaded)
    assert all(p.is_meta and not p.requires_grad for p in meta.parameters()) and not meta.training
    assert meta.config._name_or_path == "" and loaded.config._name_or_path != ""
    assert (find_module(meta, "v_head") is not None) == (source == "llama_factory_full")


def test_loading_draws_no_random_numbers_from_the_global_stream(make_cfg, rm_lora, llama_factory):
    """Under sharded strategies rank 0 alone loads the reward model for real: its random stream must stay the
    other ranks'."""
    for folder, kind in ((rm_lora, "lora"), (llama_factory["full"][0], "full")):
        cfg, tokenizer = _policy(make_cfg, reward_model=str(folder), reward_model_type=kind)
        torch.manual_seed(0)
        build_reward_model(cfg, tokenizer, torch.float32)
        after = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(torch.rand(4), after), kind


def _folders(tmp: Path, rm_lora: Path, llama_factory: dict) -> dict:
    """Folders that are not a usable reward model, each in its own way."""
    (tmp / "empty").mkdir()
    bad_head = tmp / "bad_value_head"
    shutil.copytree(llama_factory["full"][0], bad_head)
    _save_value_head(bad_head, hidden=64)
    other_vocab = make_llama(tmp / "other_vocab", vocab=1280)
    _save_value_head(other_vocab, hidden=128)
    return {
        "adapter": str(rm_lora),
        "model": str(TINY_MODEL),
        "empty": str(tmp / "empty"),
        "bad_value_head": str(bad_head),
        "other_vocab": str(other_vocab),
        "llama_factory": str(llama_factory["full"][0]),
    }


MISTAKES = {
    "no_reward_model": ({}, "reward_model", "stage ppo scores completions with a reward model"),
    "lora_reward_for_full_policy": (
        {"reward_model": "adapter", "finetuning_type": "full"},
        "reward_model_type",
        "full/freeze PPO needs reward_model_type: full",
    ),
    "adapters_on_a_lora_reward": (
        {"reward_model": "adapter", "reward_model_adapters": "adapter"},
        "reward_model_adapters",
        "reward_model_type: full",
    ),
    "not_a_folder": ({"reward_model": "/nowhere/rm"}, "reward_model", "is not a folder"),
    "neither_model_nor_adapter": ({"reward_model": "empty"}, "reward_model", "is neither a model"),
    "whole_model_as_lora": ({"reward_model": "model"}, "reward_model", "set reward_model_type: full"),
    "adapter_as_full": ({"reward_model": "adapter", "reward_model_type": "full"}, "reward_model", "is a LoRA adapter"),
    "adapters_not_adapters": (
        {"reward_model": "llama_factory", "reward_model_type": "full", "reward_model_adapters": "empty"},
        "reward_model_adapters",
        "has no adapter_config.json",
    ),
    "no_score_head_nor_value_head": (
        {"reward_model": "model", "reward_model_type": "full"},
        "reward_model",
        f"has no score head (a SEQ_CLS adapter or a *ForSequenceClassification model) and no {VALUE_HEAD_FILE}",
    ),
    "value_head_of_another_size": (
        {"reward_model": "bad_value_head", "reward_model_type": "full"},
        "reward_model",
        "v_head.summary.weight has shape [1, 64], expected [1, 96]",
    ),
    "other_vocabulary": (
        {"reward_model": "other_vocab", "reward_model_type": "full"},
        "reward_model",
        "its vocabulary has 1280 tokens, the policy's",
    ),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_reward_model_mistakes_are_one_line_errors_naming_the_key(make_cfg, rm_lora, llama_factory, tmp_path, case):
    finetuning, key, fragment = MISTAKES[case]
    folders = _folders(tmp_path, rm_lora, llama_factory)
    cfg, _ = _policy(
        make_cfg, **{k: folders.get(v, v) if k.startswith("reward_model") else v for k, v in finetuning.items()}
    )
    with pytest.raises(UserError) as err:
        check_reward_model(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key}: "), message
    assert fragment in message, message
    if case == "other_vocabulary":
        assert "1168" in message


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_a_sharded_rm_checkpoint_scores_as_load_weights_reads_it(make_cfg, ranking, tmp_path, backend):
    """A checkpoint-N of a 2-rank rm run (DCP shards, or a DeepSpeed engine checkpoint) as ppo's reward model."""
    from lf_dist.serve.weights import load_weights

    from .test_distributed import lf_dist_train

    sharding = "strategy=fsdp2" if backend == "fsdp2" else f"deepspeed={ROOT / 'examples/deepspeed/ds_z3_config.json'}"
    out = tmp_path / "rm"
    lf_dist_train(ROOT / "examples/tiny/rm_lora.yaml", f"output_dir={out}", "max_steps=3", "save_steps=2",
                  "max_samples=32", "val_size=0", "eval_strategy=no", sharding)  # fmt: skip
    folder = out / "checkpoint-2"
    cfg, tokenizer = _policy(make_cfg, reward_model=str(folder), reward_model_type="lora")
    batch, last = ranking
    scores = reward_scores(build_reward_model(cfg, tokenizer, torch.float32), batch["input_ids"], last)
    reference, _ = load_weights(
        cfg.replace(model={"adapter_name_or_path": str(folder)}), tokenizer, torch.float32, torch.device("cpu"), True
    )
    torch.testing.assert_close(scores, _seq_cls_reference(reference, batch), atol=1e-5, rtol=1e-5)
    assert scores.std() > 0
