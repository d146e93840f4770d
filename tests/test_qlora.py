"""QLoRA through bitsandbytes (its CPU backend here) on one device: the 4-bit base trains adapters that reload onto
a freshly quantized base; under FSDP2 through torchao's NF4, sharded: 2 ranks hold half the quantized storage and
give the 1-process losses; what cannot run is refused in one line."""

from __future__ import annotations

import json
import math
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


def _eval_loss_on_a_fresh_quantized_base(cfg, out: Path, nf4: bool = False) -> float:
    """The eval loss of the trained adapter on a base quantized anew: bitsandbytes, or (`nf4`) torchao's NF4 as
    FSDP2 quantizes it, on one rank."""
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
    base = load_model(cfg, tokenizer, get_stage("sft").head, quantize=not nf4)
    if nf4:
        from lf_dist.parallel.base import decoder_layers
        from lf_dist.parallel.nf4 import nf4_params, quantize

        base.requires_grad_(False)
        assert quantize(base, decoder_layers(base), 1) == [] and nf4_params(base)
    else:
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


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    """Linear layers whose NF4 blocks split over 2 ranks (rows and rows·cols / 16384 even)."""
    return make_llama(tmp_path_factory.mktemp("nf4") / "model", hidden=256, intermediate=1024)


def _nf4_bytes(model: Path, adapter: Path) -> float:
    """What one process holds for this QLoRA model: NF4 for the decoder's linear weights (4 bits, an 8-bit scaler
    per 64, an fp32 factor per 16,384), bf16 for the rest of the base, fp32 adapters."""
    from safetensors import safe_open

    from lf_dist.parallel.nf4 import bytes_per_value

    with safe_open(model / "model.safetensors", "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        lora = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    linear = sum(n for k, n in sizes.items() if ".layers." in k and k.endswith("proj.weight"))
    return linear * bytes_per_value() + 2 * (sum(sizes.values()) - linear) + 4 * lora


@pytest.mark.slow
def test_fsdp2_qlora_shards_nf4_weights_and_matches_one_process(nf4_model, tmp_path):
    """2 FSDP2 ranks hold half the NF4 storage each and train to the 1-process NF4 run's losses (that run
    accumulates the same per-rank micro-batches: bf16 matmuls over other row groupings round differently)."""
    common = [
        *base_overrides(tmp_path / "x", model_name_or_path=nf4_model, quantization_bit=4, max_steps=6, bf16=True),
        "strategy=fsdp2",
        "per_device_train_batch_size=1",
        "val_size=0.1",
    ]
    common = [o for o in common if not o.startswith(("output_dir=", "per_device_train_batch_size=4"))]
    one, two = tmp_path / "one", tmp_path / "two"
    lf_dist_train(SFT, *common, f"output_dir={one}", "gradient_accumulation_steps=2", nproc=1)
    lf_dist_train(SFT, *common, f"output_dir={two}", "gradient_accumulation_steps=1")
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-4), (_losses(two), _losses(one))
    assert sum(_losses(two)[-2:]) / 2 < _losses(two)[0]
    plan = json.loads((two / "run_plan.json").read_text(encoding="utf-8"))
    assert (plan["strategy"], plan["world_size"], plan["quantization_bit"]) == ("fsdp2", 2, 4)
    assert plan["unquantized_layers"] == {}  # every linear layer splits over 2 ranks
    whole = json.loads((one / "all_results.json").read_text(encoding="utf-8"))["weight_bytes_per_rank"]
    halves = json.loads((two / "all_results.json").read_text(encoding="utf-8"))["weight_bytes_per_rank"]
    assert whole == [pytest.approx(_nf4_bytes(nf4_model, one), rel=0.01)]
    assert halves == [pytest.approx(whole[0] / 2, rel=0.05)] * 2, (halves, whole)

    # the adapter reloads onto a freshly quantized NF4 base (the training's eval loss) and merges onto bf16
    from lf_dist.run_checks import load_config

    cfg = load_config(None, [*common, f"output_dir={two}", "gradient_accumulation_steps=1"])
    assert _eval_loss_on_a_fresh_quantized_base(cfg, two, nf4=True) == pytest.approx(
        json.loads((two / "all_results.json").read_text(encoding="utf-8"))["eval_loss"], abs=1e-3
    )
    export = tmp_path / "infer.yaml"
    export.write_text(
        f"model_name_or_path: {nf4_model}\nadapter_name_or_path: {two}\ntemplate: chatml\n"
        f"export_dir: {tmp_path / 'merged'}\n",
        encoding="utf-8",
    )
    assert main(["export", str(export)]) == 0
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 16))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    from peft import PeftModel

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(nf4_model), two)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


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
        (
            {"quantization_bit": 8, "strategy": "fsdp2"},
            "quantization_bit: fsdp2 shards 4-bit nf4 weights (torchao), not 8-bit nf4 (bitsandbytes, which does",
        ),
        (
            {"quantization_bit": 4, "quantization_type": "fp4", "strategy": "fsdp2"},
            "quantization_bit: fsdp2 shards 4-bit nf4 weights (torchao), not 4-bit fp4",
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


@pytest.mark.cuda
def test_qlora_of_a_qwen_sized_model_on_a_gpu_peaks_within_ten_percent_of_the_plan(tmp_path):
    """The 4-bit route the plan picks on one GPU trains a Qwen2.5-0.5B-shaped model (random weights, bf16) and
    CUDA's allocated peak is the plan's estimate ±10%."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .conftest import TINY_MODEL

    path = tmp_path / "qwen"
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    config = AutoConfig.from_pretrained(ROOT / "examples" / "model-configs" / "Qwen2.5-0.5B")
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "out"
    overrides = base_overrides(out, model_name_or_path=path, quantization_bit=4, bf16=True, max_steps=8)
    lf_dist_train(SFT, *overrides, "cutoff_len=512", nproc=None)
    losses, last = _losses(out), _log(out)[-1]
    assert losses[-1] < losses[0]
    assert last["peak_memory_gb"] == pytest.approx(last["planned_peak_memory_gb"], rel=0.1), last


@pytest.mark.slow
def test_fsdp2_qlora_dpo_with_a_reference_model_matches_one_process(nf4_model, tmp_path):
    """DPO on a 4-bit NF4 base with its own reference model (bf16, sharded like the policy): 2 ranks give the
    1-process losses."""
    common = [
        *base_overrides(tmp_path / "x", model_name_or_path=nf4_model, quantization_bit=4, max_steps=4, bf16=True),
        "stage=dpo",
        "dataset=ranking_demo",
        f"ref_model={nf4_model}",
        "strategy=fsdp2",
        "per_device_train_batch_size=1",
    ]
    common = [o for o in common if not o.startswith(("output_dir=", "per_device_train_batch_size=4"))]
    one, two = tmp_path / "one", tmp_path / "two"
    lf_dist_train(SFT, *common, f"output_dir={one}", "gradient_accumulation_steps=2", nproc=1)
    lf_dist_train(SFT, *common, f"output_dir={two}", "gradient_accumulation_steps=1")
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-4), (_losses(two), _losses(one))
    assert all(math.isfinite(x) for x in _losses(two))
