"""LLaMA-Factory's own 41 example training configs (tests/fixtures/lf_examples, verbatim), as a user runs them from
a LLaMA-Factory checkout with the tiny model: every one reads, validates and plans or is refused in one line, and
the refusals are exactly those the machine cannot run. The full runs are benchmarks/lf_examples.py (RESULTS.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.lf_examples import EXPANDED, FIXTURE, TINY, expanded_tiny_model
from lf_dist.errors import UserError

CONFIGS = sorted(str(p.relative_to(FIXTURE / "examples")) for p in (FIXTURE / "examples").rglob("*.yaml"))
# refused before launch on this CPU machine, and why (a substring of the one line)
REFUSED_HERE = {
    "extras/fp8/llama3_fp8_deepspeed_sft.yaml": "fp8: float8 training needs a CUDA GPU",
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": "fp8: float8 training needs a CUDA GPU",
    "extras/mod/llama3_full_sft.yaml": "mixture_of_depths: needs the mixture-of-depth package",
    # multimodal: their vision keys, or their vision-language template
    "train_full/mossvl_full_sft.yaml": "'freeze_vision_tower': multimodal training",
    "train_full/qwen3vl_full_sft.yaml": "'freeze_vision_tower': multimodal training",
    "train_lora/mossvl_lora_sft.yaml": "'freeze_vision_tower': multimodal training",
    "extras/oft/qwen2_5vl_oft_sft.yaml": "template: unknown template 'qwen2_vl'",
    "train_lora/qwen3vl_lora_dpo.yaml": "template: unknown template 'qwen3_vl_nothink'",
    "train_lora/qwen3vl_lora_sft.yaml": "template: unknown template 'qwen3_vl_nothink'",
}
CUDA_ONLY = ("extras/fp8/",)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch copy of the examples folder with LLaMA-Pro's expanded tiny model where expand.sh puts it."""
    work = tmp_path_factory.mktemp("lf_examples")
    shutil.copytree(FIXTURE, work, dirs_exist_ok=True)
    expanded_tiny_model(work / EXPANDED)
    return work


def test_the_fixture_holds_llamafactorys_41_training_configs():
    assert len(CONFIGS) == 41


def _plan(work: Path, name: str):
    from lf_dist.planner import detect, make_plan
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    model = work / EXPANDED if name.startswith("extras/llama_pro") else TINY
    cfg = load_config(work / "examples" / name, [f"model_name_or_path={model}", "max_steps=3", "report_to=none"])
    plan = make_plan(cfg, detect(), get_stage(cfg.finetuning.stage))
    from lf_dist.data.templates import get_template
    from lf_dist.model.loader import load_tokenizer

    get_template(cfg.data.template, load_tokenizer(cfg), cfg.data)  # what the worker reads first
    return plan


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_plans_or_is_refused_in_one_line(checkout, monkeypatch, name):
    monkeypatch.chdir(checkout)  # the configs' relative paths (data, examples/deepspeed, saves/) are a checkout's
    if name in REFUSED_HERE and not (torch.cuda.is_available() and name.startswith(CUDA_ONLY)):
        with pytest.raises(UserError, match=REFUSED_HERE[name]) as err:
            _plan(checkout, name)
        assert "\n" not in str(err.value)
        return
    plan = _plan(checkout, name)
    assert plan.fits, plan.summary() if hasattr(plan, "summary") else plan
