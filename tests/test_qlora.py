"""QLoRA through bitsandbytes (its CPU backend here): the 4-bit base trains adapters that reload onto a freshly
quantized base, FSDP2 over 2 ranks gives the 1-process losses, and what cannot run is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lf_dist.cli import main
from lf_dist.worker import run

from .conftest import ROOT, base_overrides, make_llama, stage_data
from .test_distributed import lf_dist_train

pytest.importorskip("bitsandbytes")
SFT = ROOT / "examples" / "tiny" / "sft_lora.yaml"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("qlora") / "model")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in _log(out) if "loss" in e]


def _eval_loss_on_a_fresh_quantized_base(cfg, out: Path) -> float:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.model import load_model
    from lf_dist.model.loader import is_quantized
    from lf_dist.train.stages import build_loss, get_stage

    tokenizer = AutoTokenizer.from_pretrained(out)
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    eval_ds = build_datasets(cfg, tokenizer, template, stage_data(cfg)).eval
    base = load_model(cfg, tokenizer, get_stage("sft").head)
    assert is_quantized(base)
    model = PeftModel.from_pretrained(base, out).eval()
    loss_fn, collate = build_loss(cfg), get_stage("sft").data.make_collator(tokenizer, cfg.data.cutoff_len)
    total, units = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_ds), 8):
            batch = collate([eval_ds[j] for j in range(i, min(i + 8, len(eval_ds)))])
            loss, _ = loss_fn(model, batch)
            total, units = total + float(loss), units + loss_fn.num_units(batch)
    return total / units


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_learns_and_the_adapter_reloads_onto_a_freshly_quantized_base(make_cfg, model, bits):
    cfg = make_cfg(f"q{bits}", model_name_or_path=model, quantization_bit=bits, max_steps=20, learning_rate=5e-3)
    cfg.data.val_size = 0.1
    results = run(cfg)
    out = Path(cfg.train.output_dir)
    losses = _losses(out)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    plan = json.loads((out / "run_plan.json").read_text(encoding="utf-8"))
    assert plan["quantization_bit"] == bits and plan["finetuning_type"] == "lora"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert _eval_loss_on_a_fresh_quantized_base(cfg, out) == pytest.approx(results["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_eight_bit_adamw_lowers_the_loss(make_cfg, model, optim):
    cfg = make_cfg(optim, model_name_or_path=model, quantization_bit=4, optim=optim, max_steps=15, learning_rate=5e-3)
    run(cfg)
    losses = _losses(Path(cfg.train.output_dir))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert "optim" not in cfg.ignored


@pytest.mark.slow
def test_fsdp2_qlora_on_two_ranks_matches_one_process(model, tmp_path):
    common = [*base_overrides(tmp_path / "x"), f"model_name_or_path={model}", "quantization_bit=4", "max_steps=6"]
    common = [o for o in common if not o.startswith(("output_dir=", "per_device_train_batch_size="))]
    one = tmp_path / "one"
    lf_dist_train(SFT, *common, f"output_dir={one}", "per_device_train_batch_size=4", nproc=None)
    two = tmp_path / "two"
    lf_dist_train(SFT, *common, f"output_dir={two}", "per_device_train_batch_size=2", "strategy=fsdp2")
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-4)
    plan = json.loads((two / "run_plan.json").read_text(encoding="utf-8"))
    assert (plan["strategy"], plan["world_size"], plan["quantization_bit"]) == ("fsdp2", 2, 4)
    from safetensors.torch import load_file

    ours, ref = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"finetuning_type": "full", "quantization_bit": 4},
            "quantization_bit: a quantized base trains only adapters",
        ),
        ({"quantization_bit": 3}, "quantization_bit: 3 is not one of 4, 8"),
        ({"quantization_method": "gptq", "quantization_bit": 4}, "quantization_method: 'gptq' is not implemented"),
        (
            {"quantization_bit": 4, "deepspeed": ROOT / "examples/deepspeed/ds_z3_config.json"},
            "quantization_bit: not supported with DeepSpeed",
        ),
    ],
)
def test_what_qlora_cannot_run_is_refused_in_one_line(tmp_path, capsys, model, overrides, message):
    out = tmp_path / "out"
    code = main(["train", str(SFT), *base_overrides(out, model_name_or_path=model, **overrides)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not out.exists()


@pytest.mark.cuda
def test_qlora_on_a_gpu_learns_in_less_memory_than_lora(make_cfg, model):
    runs = {}
    for name, extra in (("lora", {}), ("qlora", {"quantization_bit": 4})):
        cfg = make_cfg(name, model_name_or_path=model, bf16=True, max_steps=10, learning_rate=5e-3, **extra)
        torch.cuda.reset_peak_memory_stats()
        results = run(cfg)
        runs[name] = (results["peak_memory_gb"], _losses(Path(cfg.train.output_dir)))
    assert runs["qlora"][1][-1] < runs["qlora"][1][0]
    assert runs["qlora"][0] < runs["lora"][0]
