"""do_predict + predict_with_generate, as LLaMA-Factory's sft stage runs it (examples/extras/nlg_eval/
llama3_lora_predict.yaml on the tiny model): the answers are what `lf-dist chat` answers each eval prompt, in the
dataset's order, scored with LLaMA-Factory's formulas; two ranks write the same file; after training, the trained
weights answer; a mistake is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_DIR, TINY_MODEL

RECORDS = json.loads((DATA_DIR / "alpaca_demo.json").read_text(encoding="utf-8"))
METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")
NEW_TOKENS = 12


def _config(tmp_path: Path, name: str, **keys) -> Path:
    """LLaMA-Factory's nlg_eval predict example, on the tiny model and demo data, greedy."""
    values = {
        "model_name_or_path": TINY_MODEL,
        "trust_remote_code": True,
        "stage": "sft",
        "do_predict": True,
        "finetuning_type": "lora",
        "eval_dataset": "alpaca_demo",
        "dataset_dir": DATA_DIR,
        "template": "chatml",
        "cutoff_len": 128,
        "max_samples": 10,
        "output_dir": tmp_path / name,
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_eval_batch_size": 4,  # 10 prompts: two full left-padded batches and a short one
        "predict_with_generate": True,
        "do_sample": False,
        "max_new_tokens": NEW_TOKENS,
        "disable_tqdm": True,
    }
    values.update(keys)
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items() if v is not None), encoding="utf-8")
    return path


def _lf_dist(config: Path, *overrides: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if nproc is not None:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(nproc))
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(config), *overrides],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
        check=False,
    )


def _predict(config: Path, *overrides: str, nproc: int | None = None) -> Path:
    proc = _lf_dist(config, *overrides, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _out(config)


def _out(config: Path) -> Path:
    line = next(x for x in config.read_text(encoding="utf-8").splitlines() if x.startswith("output_dir: "))
    return Path(line.split(": ", 1)[1])


def _rows(out: Path) -> list[dict]:
    lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _messages(record: dict) -> list[dict]:
    """An alpaca record's prompt (instruction, then the input on the next line), as LLaMA-Factory aligns it."""
    content = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    return [{"role": "user", "content": content}]


def _chat_engine(tmp_path: Path, **keys):
    from lf_dist.run_checks import load_config
    from lf_dist.serve.engine import ChatEngine

    path = tmp_path / "chat.yaml"
    values = {"model_name_or_path": TINY_MODEL, "template": "chatml", "do_sample": False, **keys}
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()), encoding="utf-8")
    return ChatEngine(load_config(path, [f"max_new_tokens={NEW_TOKENS}"], command="chat"))


def _assert_chat_answers(rows: list[dict], engine) -> None:
    """Each row's prompt is a dataset record's prompt as the template renders it, its label the record's answer,
    its prediction what chat answers that prompt."""
    by_prompt = {}
    for record in RECORDS:
        prompt = engine.tokenizer.decode(engine.encode(_messages(record)), skip_special_tokens=False)
        by_prompt.setdefault(prompt, record)
    for row in rows:
        record = by_prompt[row["prompt"]]
        assert row["label"] == record["output"]
        assert row["predict"] == engine.chat(_messages(record)).text, row


# -- the metric ---------------------------------------------------------------------------------------------
PAIRS = [
    ("apple meadow silver", "apple meadow silver"),
    ("The capital is Brightwater.", "The capital of Hollin is Brightwater."),
    ("我喜欢吃苹果，也喜欢香蕉。", "我爱吃苹果和香蕉。"),
    ("", "STONE"),  # an empty prediction: ROUGE 0 (no word), BLEU as nltk scores it
    ("nretnal", "nretnla"),
]


def _llamafactory_scores(pred: str, label: str) -> dict:
    """LLaMA-Factory's ComputeSimilarity for one pair, written out here from its source."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    return {**scores, "bleu-4": round(bleu * 100, 4)}


def test_scores_are_llamafactorys_formulas():
    import numpy as np

    from lf_dist.train.nlg_metrics import example_scores, similarity

    expected = [_llamafactory_scores(p, label) for p, label in PAIRS]
    assert [example_scores(p, label) for p, label in PAIRS] == expected
    assert expected[0] == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    assert expected[3]["rouge-1"] == 0.0 and expected[3]["bleu-4"] == 0.0
    assert 0 < expected[2]["rouge-1"] < 100 and 0 < expected[2]["bleu-4"] < 100  # words cut by jieba, chars by BLEU
    means = similarity([p for p, _ in PAIRS], [label for _, label in PAIRS])
    assert means == {k: float(np.mean([e[k] for e in expected])) for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")}


def test_missing_scoring_library_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from lf_dist.errors import UserError
    from lf_dist.train import nlg_metrics

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jieba" else real(name, *a))
    with pytest.raises(UserError, match=r"needs jieba; pip install 'lf-dist\[predict\]'") as err:
        nlg_metrics.similarity(["a"], ["a"])
    assert "\n" not in str(err.value)


def test_do_predict_reads_the_generation_keys(tmp_path):
    from lf_dist.run_checks import load_config

    cfg = load_config(_config(tmp_path, "cfg", temperature=0.3, top_k=5))
    assert cfg.train.do_train is False and cfg.generation.temperature == 0.3
    assert not {"temperature", "top_k", "do_sample", "max_new_tokens"} & set(cfg.ignored)
    assert "temperature" in load_config(_config(tmp_path, "cfg", do_predict=None, predict_with_generate=None,
                                                dataset="alpaca_demo", temperature=0.3)).ignored  # fmt: skip


# -- runs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> Path:
    """A predict-only run of the example config (eval_dataset alone, nothing trained)."""
    root = tmp_path_factory.mktemp("predict")
    return _predict(_config(root, "out"))


def test_predictions_are_chats_answers_in_dataset_order_and_scored(predicted, tmp_path):
    from lf_dist.train.nlg_metrics import similarity

    rows = _rows(predicted)
    assert [r["label"] for r in rows] == [r["output"] for r in RECORDS[:10]]  # the dataset's order
    _assert_chat_answers(rows, _chat_engine(tmp_path))
    results = json.loads((predicted / "predict_results.json").read_text(encoding="utf-8"))
    scores = similarity([r["predict"] for r in rows], [r["label"] for r in rows])
    assert {k: results[k] for k in METRICS} == {f"predict_{k}": v for k, v in scores.items()}
    assert results["predict_runtime"] > 0 and results["predict_samples_per_second"] > 0
    assert results["predict_steps_per_second"] > 0
    assert json.loads((predicted / "all_results.json").read_text(encoding="utf-8")) == results
    assert not (predicted / "adapter_model.safetensors").exists()  # nothing trained, nothing saved


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_write_the_one_process_file(predicted, tmp_path, strategy):
    out = _predict(_config(tmp_path, "out"), f"strategy={strategy}", nproc=2)
    name = "generated_predictions.jsonl"
    assert (out / name).read_bytes() == (predicted / name).read_bytes()
    ranks = json.loads((out / "predict_results.json").read_text(encoding="utf-8"))
    one = json.loads((predicted / "predict_results.json").read_text(encoding="utf-8"))
    assert {k: ranks[k] for k in METRICS} == {k: one[k] for k in METRICS}


def test_train_then_predict_answers_with_the_trained_weights(tmp_path):
    split = {"dataset": "alpaca_demo", "eval_dataset": None, "val_size": 8, "max_samples": 64}
    trained = _predict(
        _config(tmp_path, "trained", do_train=True, max_steps=20, learning_rate=5e-3, **split), "logging_steps=5"
    )
    base = _predict(_config(tmp_path, "base", **split))  # the same val_size split, on the base model
    rows, base_rows = _rows(trained), _rows(base)
    assert len(rows) == 8 and [r["prompt"] for r in rows] == [r["prompt"] for r in base_rows]
    assert sum(r["predict"] != b["predict"] for r, b in zip(rows, base_rows)) >= 4
    _assert_chat_answers(rows, _chat_engine(tmp_path, adapter_name_or_path=trained))
    results = json.loads((trained / "all_results.json").read_text(encoding="utf-8"))
    assert "train_loss" in results and set(METRICS) <= set(results)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"predict_with_generate": None}, "do_predict: set predict_with_generate: true"),
        ({"eval_dataset": None, "dataset": "alpaca_demo", "do_train": True}, "do_predict: needs eval_dataset"),
        # predict-only (do_train is false unless given), nothing to answer
        ({"eval_dataset": None, "dataset": "alpaca_demo"}, "do_predict: needs eval_dataset (or dataset with"),
    ],
)  # fmt: skip
def test_a_predict_mistake_is_one_line_and_writes_nothing(tmp_path, keys, message):
    proc = _lf_dist(_config(tmp_path, "out", **keys))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lf-dist: ")]
    assert len(lines) == 1 and lines[0].startswith(f"lf-dist: error: {message}"), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
