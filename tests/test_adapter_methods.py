"""LLaMA-Factory's adapter and model options through peft: OFT (trains, saves, reloads, exports merged, on a 4-bit
base, under ddp), PiSSA (an exact start, and the trained adapter converted for the original base), LLaMA-Pro
(only the expanded blocks train), use_reentrant_gc (the checkpointing really switches) and pure_bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lf_dist.cli import main
from lf_dist.errors import UserError
from lf_dist.model import apply_finetuning, load_model, load_tokenizer
from lf_dist.run_checks import load_config
from lf_dist.worker import run

from .conftest import TINY_MODEL, base_overrides, make_llama

IDS = torch.tensor([[1, 15, 27, 99, 311, 42, 7, 250, 18, 3]])


def _losses(out: Path) -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e]


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _cfg(tmp_path, name="run", **keys):
    return load_config(None, base_overrides(tmp_path / name, **keys))


def _built(cfg):
    return apply_finetuning(load_model(cfg, load_tokenizer(cfg)), cfg, quiet=True)


def _base(path=TINY_MODEL):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


# -- OFT ---------------------------------------------------------------------------------------------------------


def test_oft_wraps_every_linear_layer_but_the_output_and_trains_only_its_rotations(tmp_path):
    from peft.tuners.oft import OFTLayer

    cfg = _cfg(tmp_path, finetuning_type="oft", oft_block_size=16, disable_gradient_checkpointing=True)
    model = _built(cfg)
    base = _base()
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    wrapped = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, OFTLayer)}
    assert set(wrapped) == linear and len(linear) == 14  # 7 projections × 2 layers
    for m in wrapped.values():
        rot = m.oft_R["default"]
        assert rot.block_size == 16 and rot.r * 16 == m.get_base_layer().in_features
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".oft_R.default." in n for n in trainable)
    assert model.peft_config["default"].peft_type == "OFT"


def test_oft_learns_saves_reloads_and_exports_merged(tmp_path):
    from peft import PeftModel

    cfg = _cfg(tmp_path, "oft", finetuning_type="oft", max_steps=30, learning_rate=1e-2)
    run(cfg)
    out = Path(cfg.train.output_dir)
    losses = _losses(out)
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.3, losses
    assert json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["peft_type"] == "OFT"
    adapted = PeftModel.from_pretrained(_base(), out)
    assert not torch.allclose(_logits(adapted), _logits(_base()), atol=1e-3)  # it trained something
    infer = tmp_path / "infer.yaml"
    keys = {"model_name_or_path": TINY_MODEL, "adapter_name_or_path": out, "template": "chatml"}
    infer.write_text("".join(f"{k}: {v}\n" for k, v in {**keys, "export_dir": tmp_path / "merged"}.items()))
    assert main(["export", str(infer)]) == 0
    merged = _base(tmp_path / "merged")
    assert not any("oft" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), _logits(adapted), atol=1e-4, rtol=1e-4)


def test_oft_trains_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.oft import OFTLayer

    model_dir = make_llama(tmp_path / "model")
    keys = {"model_name_or_path": model_dir, "finetuning_type": "oft", "quantization_bit": 4}
    model = _built(_cfg(tmp_path, "probe", **keys))
    layers = [m for m in model.modules() if isinstance(m, OFTLayer)]
    assert layers and all(type(m.get_base_layer()).__name__ == "Linear4bit" for m in layers)
    cfg = _cfg(tmp_path, "q4", max_steps=20, learning_rate=1e-2, **keys)
    run(cfg)
    losses = _losses(Path(cfg.train.output_dir))
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.3, losses


def test_planner_sizes_oft_as_an_adapter_and_keeps_it_on_fallback(tmp_path):
    from lf_dist.planner.decide import _candidates
    from lf_dist.planner.model_size import trainable_params
    from lf_dist.train.stages import get_stage

    cfg = _cfg(tmp_path, finetuning_type="oft", allow_fallback=True)
    model = _built(cfg.replace(finetuning={"disable_gradient_checkpointing": True}))
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.get_base_model().config
    assert trainable_params(config, get_stage("sft").head, cfg, "oft") == actual == 25_792
    assert _candidates(cfg) == [("oft", None), ("oft", 4)]


@pytest.mark.slow
def test_oft_under_ddp_matches_one_process(tmp_path):
    from .test_distributed import _config, assert_same_training, lf_dist_train

    config = _config(tmp_path, "oft")
    lf_dist_train(config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4", nproc=None)
    lf_dist_train(config, f"output_dir={tmp_path / 'ddp'}", "strategy=ddp")
    assert_same_training(tmp_path / "ddp", tmp_path / "one")


# -- PiSSA -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pissa_iter", "init"), [(-1, "pissa"), (4, "pissa_niter_4")])
def test_pissa_starts_exactly_at_the_base_model(tmp_path, pissa_iter, init):
    cfg = _cfg(tmp_path, pissa_init=True, pissa_iter=pissa_iter, disable_gradient_checkpointing=True)
    model = _built(cfg)
    assert model.peft_config["default"].init_lora_weights == init
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 1e-3  # the principal part moved into the adapter (plain LoRA starts B at zero)
    torch.testing.assert_close(_logits(model), _logits(_base()), atol=1e-4, rtol=1e-4)


def test_pissa_convert_writes_a_lora_adapter_for_the_original_base(tmp_path):
    from peft import PeftModel

    keys = {"pissa_init": True, "pissa_iter": -1, "pissa_convert": True, "lora_rank": 4}
    cfg = _cfg(tmp_path, "pissa", max_steps=15, learning_rate=5e-3, **keys)
    run(cfg)
    out = Path(cfg.train.output_dir)
    for name in ("pissa_init", "pissa_backup", "pissa_converted"):
        assert (out / name / "adapter_model.safetensors").is_file(), name
    converted = json.loads((out / "pissa_converted" / "adapter_config.json").read_text(encoding="utf-8"))
    assert (converted["r"], converted["init_lora_weights"]) == (8, True)
    # the trained model: the root adapter's config says PiSSA, so peft decomposes the base again on loading
    trained = _logits(PeftModel.from_pretrained(_base(), out))
    assert not torch.allclose(trained, _logits(_base()), atol=1e-3)
    on_original = _logits(PeftModel.from_pretrained(_base(), out / "pissa_converted"))
    torch.testing.assert_close(on_original, trained, atol=1e-4, rtol=1e-4)


def test_pissa_conversion_equals_peft_own(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lf_dist.model import pissa

    model = get_peft_model(_base(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "out" / "pissa_init")
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "out/pissa_init"))
    pissa.convert_saved(tmp_path / "out")
    ours, theirs = tmp_path / "out" / "pissa_converted", tmp_path / "peft"
    a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    read = [json.loads((d / "adapter_config.json").read_text(encoding="utf-8")) for d in (ours, theirs)]
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "peft_type"):
        assert read[0][key] == read[1][key], key
    assert sorted(read[0]["target_modules"]) == sorted(read[1]["target_modules"])


# -- LLaMA-Pro ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("pro") / "model", layers=4)


def test_llama_pro_freeze_trains_only_the_expanded_blocks(tmp_path, four_layers):
    keys = {"model_name_or_path": four_layers, "finetuning_type": "freeze", "use_llama_pro": True}
    model = _built(_cfg(tmp_path, freeze_trainable_layers=2, **keys))
    assert {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"1", "3"}
    cfg = _cfg(tmp_path, "pro", freeze_trainable_layers=2, max_steps=3, learning_rate=1e-2, **keys)
    run(cfg)
    before, after = (
        load_file(four_layers / "model.safetensors"),
        load_file(Path(cfg.train.output_dir) / "model.safetensors"),
    )
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed and {k.split(".")[2] for k in changed} == {"1", "3"}
    assert all(k.startswith("model.layers.") for k in changed)
    with pytest.raises(UserError, match=r"^use_llama_pro: freeze_trainable_layers \(3\) must .* divide"):
        _built(_cfg(tmp_path, freeze_trainable_layers=3, **keys))


def test_llama_pro_lora_adapts_only_the_expanded_blocks(tmp_path, four_layers):
    from peft.tuners.lora import LoraLayer

    keys = {"model_name_or_path": four_layers, "use_llama_pro": True, "freeze_trainable_layers": 2}
    model = _built(_cfg(tmp_path, **keys))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 14 and {n.split(".")[4] for n in adapted} == {"1", "3"}


# -- use_reentrant_gc, pure_bf16 ---------------------------------------------------------------------------------


def _checkpointed_grads(tmp_path, seen: list, reentrant):
    seen.clear()
    torch.manual_seed(0)
    model = _built(_cfg(tmp_path, **({} if reentrant is None else {"use_reentrant_gc": reentrant})))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return set(seen), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_use_reentrant_gc_switches_checkpointing_with_equal_gradients(tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc
    import transformers.modeling_utils as tmu

    calls, original = [], tuc.checkpoint

    def spy(*args, **kwargs):  # what torch.utils.checkpoint is asked for, layer by layer
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", spy)
    monkeypatch.setattr(tmu, "checkpoint", spy)  # transformers holds its own reference
    seen, grads = {}, {}
    for value in (None, True, False):
        seen[value], grads[value] = _checkpointed_grads(tmp_path, calls, value)
    assert seen == {None: {False}, True: {True}, False: {False}}
    assert grads[True].keys() == grads[False].keys() and any(g.abs().max() > 0 for g in grads[True].values())
    for k in grads[True]:
        torch.testing.assert_close(grads[True][k], grads[False][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_pure_bf16_keeps_trainable_parameters_in_bf16(tmp_path, method):
    model = _built(_cfg(tmp_path, finetuning_type=method, pure_bf16=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_pure_bf16_run_learns(tmp_path):
    cfg = _cfg(tmp_path, "bf16", pure_bf16=True, max_steps=20, learning_rate=5e-3)
    run(cfg)
    losses = _losses(Path(cfg.train.output_dir))
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.3, losses
