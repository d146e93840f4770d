"""Token parity with LLaMA-Factory 0.9.5 (PyPI), computed in the same run from its own pipeline.

A fixed corpus (alpaca with system/history/unicode, sharegpt multi-turn with tools, function calls,
observations and a thought, openai messages with tool_calls) goes through LLaMA-Factory's `get_dataset` in its
reference venv (writing its `tokenized_path`) and through lf-dist; input_ids, attention_mask and labels must be
identical row for row, for every template, with and without truncation, and for the masking options.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lf_dist.data import build_datasets
from lf_dist.data.templates import fix_tokenizer, get_template
from lf_dist.run_checks import load_config

from .conftest import ROOT, TINY_MODEL, stage_data
from .reference import lf_venv

PARITY_DIR = ROOT / "tests" / "fixtures" / "parity"
ALL = "alpaca_parity,sharegpt_parity,openai_parity"
TEMPLATES = [
    "default",
    "empty",
    "chatml",
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "llama2",
    "llama3",
    "mistral",
    "gemma",
    "gemma3",
    "phi4",
    "deepseek3",
    "yi",
    "glm4",
]
JOBS = (
    [{"name": f"{t}_full", "template": t, "dataset": ALL, "cutoff_len": 1024} for t in TEMPLATES]
    + [{"name": f"{t}_cut", "template": t, "dataset": ALL, "cutoff_len": 40} for t in TEMPLATES]
    + [
        {"name": "tokenizer_template", "template": None, "dataset": ALL, "cutoff_len": 1024},
        {
            "name": "qwen3_mask_history",
            "template": "qwen3",
            "dataset": ALL,
            "cutoff_len": 1024,
            "extra": {"mask_history": True},
        },
        {
            "name": "llama3_mask_history_cut",
            "template": "llama3",
            "dataset": ALL,
            "cutoff_len": 60,
            "extra": {"mask_history": True},
        },
        {
            "name": "qwen3_no_thinking",
            "template": "qwen3",
            "dataset": ALL,
            "cutoff_len": 1024,
            "extra": {"enable_thinking": False},
        },
        {
            "name": "chatml_train_on_prompt",
            "template": "chatml",
            "dataset": ALL,
            "cutoff_len": 1024,
            "extra": {"train_on_prompt": True},
        },
        {
            "name": "llama3_default_system",
            "template": "llama3",
            "dataset": ALL,
            "cutoff_len": 1024,
            "extra": {"default_system": "Be kind."},
        },
        {
            "name": "qwen_tool_format_default",
            "template": "qwen",
            "dataset": ALL,
            "cutoff_len": 1024,
            "extra": {"tool_format": "default"},
        },
        {"name": "qwen_val_size", "template": "qwen", "dataset": ALL, "cutoff_len": 1024, "extra": {"val_size": 0.25}},
    ]
    # preference data: pairwise rows (rm / dpo) and kto rows, untruncated and with the budget split
    + [
        {"name": f"{t}_{stage}_{cut}", "template": t, "dataset": data, "cutoff_len": cut, "stage": stage}
        for t in ("chatml", "llama3", "qwen3")
        for stage, data in (("rm", "ranking_parity,alpaca_ranking_parity"), ("kto", "kto_parity"))
        for cut in (1024, 24)
    ]
)
PAIR_COLUMNS = tuple(
    f"{side}_{c}" for side in ("chosen", "rejected") for c in ("input_ids", "attention_mask", "labels")
)


def _columns(job: dict) -> tuple[str, ...]:
    stage = job.get("stage", "sft")
    if stage in ("rm", "dpo"):
        return PAIR_COLUMNS
    return ("input_ids", "attention_mask", "labels") + (("kto_tags",) if stage == "kto" else ())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ok, why = lf_venv.ready()
    if not ok:
        pytest.skip(f"LLaMA-Factory reference not available: {why}")
    out = tmp_path_factory.mktemp("lf_reference")
    spec = {"model": str(TINY_MODEL), "dataset_dir": str(PARITY_DIR), "out": str(out), "jobs": JOBS}
    (out / "jobs.json").write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run(
        [str(lf_venv.python_path()), str(ROOT / "tests/reference/lf_reference.py"), str(out / "jobs.json")],
        capture_output=True,
        text=True,
        check=False,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _ours(job: dict, tmp_path: Path) -> dict:
    overrides = {
        "model_name_or_path": str(TINY_MODEL),
        "dataset": job["dataset"],
        "dataset_dir": str(PARITY_DIR),
        "cutoff_len": job["cutoff_len"],
        "output_dir": str(tmp_path / "o"),
        "overwrite_cache": True,
        "tokenized_path": str(tmp_path / "tok"),
        "stage": job.get("stage", "sft"),
        **job.get("extra", {}),
    }
    if job["template"] is not None:
        overrides["template"] = job["template"]
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    bundle = build_datasets(cfg, tokenizer, template, stage_data(cfg))
    splits = {"train": bundle.train, "validation": bundle.eval}
    return {k: {c: ds[c] for c in _columns(job)} for k, ds in splits.items() if ds is not None}


@pytest.mark.parametrize("job", JOBS, ids=[j["name"] for j in JOBS])
def test_rows_are_token_identical_to_llamafactory(reference, tmp_path, job):
    theirs = json.loads((reference / f"{job['name']}.json").read_text(encoding="utf-8"))["rows"]
    ours = _ours(job, tmp_path)
    assert ours.keys() == theirs.keys()
    for split in theirs:
        for col in _columns(job):
            assert len(ours[split][col]) == len(theirs[split][col]), (split, col)
            for i, (a, b) in enumerate(zip(ours[split][col], theirs[split][col])):
                assert a == b, f"{split} row {i} {col} differs"


def test_llamafactory_tokenized_path_loads_as_ours(reference, tmp_path):
    """LLaMA-Factory's own save_to_disk output (tokenized_path) holds the same rows as lf-dist's."""
    import datasets

    saved = datasets.load_from_disk(str(reference / "chatml_full"))
    ours = _ours(next(j for j in JOBS if j["name"] == "chatml_full"), tmp_path)
    mine = datasets.load_from_disk(str(tmp_path / "tok"))
    for col in ("input_ids", "attention_mask", "labels"):
        assert saved["train"][col] == ours["train"][col] == mine["train"][col]
