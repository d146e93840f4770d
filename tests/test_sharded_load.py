"""FSDP2's sharded load: the tensors each rank makes itself equal a loaded model's, and what the files cannot
give sends the load back to rank 0 (`lf_dist/parallel/sharded_load.py`)."""

from __future__ import annotations

import pytest
import torch

from lf_dist.model.loader import load_tokenizer
from lf_dist.model.recipe import ModelRecipe
from lf_dist.parallel import sharded_load
from lf_dist.run_checks import load_config
from lf_dist.train.stages import get_stage

from .conftest import base_overrides


def _recipe(tmp_path, **extra):
    cfg = load_config(None, base_overrides(tmp_path / "out", bf16=True, **extra))
    return ModelRecipe(cfg, load_tokenizer(cfg), get_stage(cfg.finetuning.stage).head)


def _sources(recipe, trained=False):
    skeleton = recipe.build(meta=True)
    folder = skeleton.get_base_model().config._name_or_path if hasattr(skeleton, "get_base_model") else None
    folder = folder or skeleton.config._name_or_path
    return sharded_load.sources(skeleton, folder, torch.bfloat16, trained)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_tensor_a_rank_fills_equals_the_loaded_model(tmp_path, method):
    recipe = _recipe(tmp_path, finetuning_type=method)
    torch.manual_seed(3)
    real = recipe.build()
    expected = {**dict(real.named_buffers()), **dict(real.named_parameters())}
    torch.manual_seed(3)
    plan = _sources(recipe)
    after = torch.rand(4)  # the skeleton's draws leave the random state where the loaded build leaves it
    torch.manual_seed(3)
    recipe.build()
    assert torch.equal(after, torch.rand(4))
    assert plan is not None and plan.keys() == expected.keys()
    for name, source in plan.items():
        if source[0] == "value":
            value = source[1]
        else:
            from safetensors import safe_open

            with safe_open(source[1], "pt") as f:
                value = f.get_tensor(source[2]).to(source[3])
        torch.testing.assert_close(value.to(expected[name].dtype), expected[name].detach(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "extra",
    [{"stage": "rm", "dataset": "dpo_en_demo"}, {"lora_target": "all", "use_dora": True}],
    ids=["new score head", "dora"],
)
def test_what_the_files_cannot_give_falls_back_to_rank_0(tmp_path, extra):
    assert _sources(_recipe(tmp_path, finetuning_type="lora", **extra)) is None


def test_a_trained_adapter_falls_back_to_rank_0(tmp_path):
    assert _sources(_recipe(tmp_path, finetuning_type="lora"), trained=True) is None
