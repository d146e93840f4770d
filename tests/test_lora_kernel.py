"""The lean LoRA forward (lf_dist/kernels/lora.py): peft's function, two full-width passes fewer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from lf_dist.kernels import lora

from .conftest import TINY_MODEL
from .test_kernels import _plan, _rel, _said


def _peft_model(**lora_keys):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so that every adapter weight gets a gradient
    keys = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False, **lora_keys}
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **keys))


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks on both sides
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lean_copy(model):
    lean = copy.deepcopy(model)
    n = lora.apply(lean)
    assert n == sum(type(m) is LoraLinear for m in lean.modules()) > 0
    return lean


@pytest.mark.parametrize(
    "lora_keys", [{}, {"lora_dropout": 0.1}, {"use_rslora": True}], ids=["plain", "dropout", "rslora"]
)
def test_lean_lora_forward_gives_peft_loss_and_gradients(lora_keys):
    model = _peft_model(**lora_keys)
    model.train()
    lean = _lean_copy(model)
    ids = torch.randint(3, 500, (2, 48))
    loss, grads = _loss_and_grads(model, ids)
    lean_loss, lean_grads = _loss_and_grads(lean, ids)
    assert abs(float(lean_loss - loss)) <= 1e-6 * abs(float(loss))
    assert lean_grads.keys() == grads.keys() and len(grads) > 0
    worst = max(_rel(lean_grads[n], g) for n, g in grads.items())
    assert worst < 1e-5, worst


class _FullWidthMuls(TorchDispatchMode):
    """Counts multiplications whose output has `width` columns (the [tokens × out_features] update)."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.count = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("mul") and isinstance(out, torch.Tensor) and out.shape[-1] == self.width:
            self.count += 1
        return out


def test_lean_lora_scales_at_rank_r_and_adds_in_place():
    model = _peft_model()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 16, layer.in_features, requires_grad=True)
    counts = []
    for forward in (layer.forward, lora.lean_forward.__get__(layer)):
        with _FullWidthMuls(layer.out_features) as ops:
            forward(x).sum().backward()
        counts.append(ops.count)
    assert counts[0] >= 2 and counts[1] == 0, counts  # peft: the scaling, forward and backward; lean: none


def test_lean_lora_falls_back_to_peft_where_its_shortcut_does_not_hold():
    ids = torch.randint(3, 500, (2, 32))
    for keys in ({"use_dora": True}, {"lora_bias": True}):
        model = _peft_model(**keys)
        lean = _lean_copy(model)
        torch.testing.assert_close(lean(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    model = _peft_model()
    lean = _lean_copy(model)
    with model.disable_adapter(), lean.disable_adapter():  # the frozen reference of the preference stages
        torch.testing.assert_close(lean(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    base = lean(input_ids=ids).logits
    lean.merge_adapter()
    torch.testing.assert_close(lean(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)


def test_the_plan_runs_plain_lora_layers_lean_and_says_when_not():
    plan = _plan()
    assert plan.lean_lora and "added in place" in _said(plan, "LoRA forward lean")
    assert not _plan(lean_lora=False).lean_lora
    assert "as the config says" in _said(_plan(lean_lora=False), "LoRA forward peft")
    assert "DoRA" in _said(_plan(use_dora=True), "LoRA forward peft")
    assert not _plan(quantization_bit=4).lean_lora
    assert not _plan(quantization_bit=4, lean_lora=True).lean_lora  # bitsandbytes layers are peft's own classes
    assert "as the config says" in _said(_plan(lean_lora=True), "LoRA forward lean")
    full = _plan(finetuning_type="full")
    assert not full.lean_lora and not [r for r in full.reasons if r.startswith("LoRA forward")]


def test_train_runs_its_lora_layers_lean_when_the_plan_says_so(make_cfg, monkeypatch):
    from lf_dist.worker import run

    calls = []
    real = lora.lean_forward

    def counted(self, x, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(lora, "lean_forward", counted)
    cfg = make_cfg(max_steps=1)
    run(cfg)
    assert json.loads((Path(cfg.train.output_dir) / "run_plan.json").read_text(encoding="utf-8"))["lean_lora"]
    assert calls and set(calls) == {"Linear"}
    calls.clear()
    run(make_cfg("peft", max_steps=1, lean_lora=False))
    assert not calls
