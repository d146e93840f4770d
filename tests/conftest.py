from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "examples" / "tiny" / "model"
DATA_DIR = ROOT / "examples" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import datasets

    datasets.disable_progress_bars()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def base_overrides(output_dir: Path, **extra) -> list[str]:
    """A small, fast sft LoRA run on the shipped tiny model and demo data."""
    values = {
        "model_name_or_path": str(TINY_MODEL),
        "dataset": "alpaca_demo",
        "dataset_dir": str(DATA_DIR),
        "template": "chatml",
        "cutoff_len": 128,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 10,
        "logging_steps": 1,
        "save_steps": 1000,
        "disable_tqdm": True,
        "report_to": "none",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def stage_data(cfg):
    """The data kind of the config's stage (what `build_datasets` produces for it)."""
    from lf_dist.train.stages import get_stage

    return get_stage(cfg.finetuning.stage).data


@pytest.fixture
def make_cfg(tmp_path):
    from lf_dist.run_checks import load_config

    def _make(name: str = "run", **extra):
        return load_config(None, base_overrides(tmp_path / name, **extra))

    return _make


def make_llama(
    path: Path, hidden: int = 128, layers: int = 2, intermediate: int = 256, vocab: int | None = None, dtype=None
) -> Path:
    """A random-weight Llama with the tiny model's tokenizer (dims multiples of 64, as 4-bit CPU kernels need),
    saved in fp32 unless `dtype` (released checkpoints are mostly bf16)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).to(dtype or torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path
