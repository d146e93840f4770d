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
    from lf_dist.configure import load_config

    def _make(name: str = "run", **extra):
        return load_config(None, base_overrides(tmp_path / name, **extra))

    return _make
