"""The planner: exact model sizes from config.json, profiles, the memory model's choices, and `lf-dist plan|env`."""

from __future__ import annotations

import json

import pytest

from lf_dist.cli import main
from lf_dist.errors import UserError
from lf_dist.planner import PROFILES, load_profile, make_plan
from lf_dist.planner.model_size import measure, read_model_config
from lf_dist.run_checks import load_config
from lf_dist.train.stages import get_stage

from .conftest import ROOT, TINY_MODEL, base_overrides

CONFIGS = ROOT / "examples" / "model-configs"
SFT = ROOT / "examples" / "tiny" / "sft_lora.yaml"
# Published parameter counts (the models' safetensors totals on their Hugging Face pages).
PUBLISHED = {
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Llama-3.1-405B": 405_853_388_800,
    "Llama-3.2-1B": 1_235_814_400,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-72B": 72_706_203_648,
    "Qwen3-32B": 32_762_123_264,
    "Mistral-7B-v0.3": 7_248_023_552,
}


def _llama_count(c: dict) -> int:
    """The same count by hand: embeddings, per layer attention (GQA) + gated MLP + 2 norms, final norm, head."""
    h, kv = (
        c["hidden_size"],
        c["num_key_value_heads"] * c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]),
    )
    q = c["num_attention_heads"] * c.get("head_dim", h // c["num_attention_heads"])
    bias = (q + 2 * kv) if c["model_type"] == "qwen2" else 0  # Qwen2 has q/k/v biases
    qk_norm = 2 * c.get("head_dim", 0) if c["model_type"] == "qwen3" else 0
    layer = h * q + 2 * h * kv + q * h + bias + 3 * h * c["intermediate_size"] + 2 * h + qk_norm
    head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * h
    return c["vocab_size"] * h + c["num_hidden_layers"] * layer + h + head


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_only_folders_give_the_published_parameter_counts(name):
    size = measure(read_model_config(str(CONFIGS / name)), get_stage("sft").head)
    raw = json.loads((CONFIGS / name / "config.json").read_text(encoding="utf-8"))
    assert size.num_params == PUBLISHED[name] == _llama_count(raw)


def test_named_profiles_carry_memory_flops_and_bandwidth():
    assert {"cpu", "a6000x1", "rtx4090x1", "a100-40gbx8", "a100-80gbx8", "h100x8", "h200x8"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.gpu_memory_gib > 0 and p.peak_bf16_tflops > 0 and p.intra_node_gbps >= 0 and p.inter_node_gbps >= 0
    assert load_profile("h100x8", nnodes=2).world_size == 16


def test_a_profile_file_is_read_and_a_missing_field_is_one_line(tmp_path):
    good = tmp_path / "l40s.yaml"
    good.write_text(
        "gpu: NVIDIA L40S\ngpus_per_node: 4\ngpu_memory_gib: 44.5\nbf16: true\npeak_bf16_tflops: 362\n"
        "intra_node_gbps: 32\ninter_node_gbps: 12.5\n",
        encoding="utf-8",
    )
    profile = load_profile(str(good), nnodes=3)
    assert profile.name == "l40s" and profile.world_size == 12 and profile.gpu_memory_gib == 44.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu: X\ngpus_per_node: 2\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing field 'gpu_memory_gib'"):
        load_profile(str(bad))
    with pytest.raises(UserError, match="unknown profile 'h100x9'"):
        load_profile("h100x9")


def _plan(model: str, profile: str, **keys):
    values = {"model_name_or_path": CONFIGS / model, "bf16": True, "per_device_train_batch_size": 1, **keys}
    cfg = load_config(SFT, [f"{k}={v}" for k, v in values.items()])
    return make_plan(cfg, load_profile(profile), get_stage(cfg.finetuning.stage), launching=False)


def test_fallback_picks_what_fits_on_each_machine():
    """full → lora → 4-bit qlora, the first that fits."""
    small = _plan("Llama-3.1-8B", "a6000x1", finetuning_type="auto", cutoff_len=2048)
    assert (small.finetuning_type, small.quantization_bit, small.fits) == ("lora", None, True)
    big = _plan("Llama-3.1-70B", "a6000x1", finetuning_type="auto", cutoff_len=1024)
    assert (big.finetuning_type, big.quantization_bit, big.fits) == ("lora", 4, True)
    cluster = _plan("Llama-3.1-8B", "h100x8", finetuning_type="full", cutoff_len=2048)
    assert (cluster.finetuning_type, cluster.strategy, cluster.launcher, cluster.world_size) == (
        "full",
        "fsdp2",
        "torchrun",
        8,
    )
    assert cluster.fits
    gamer = _plan("Qwen2.5-7B", "rtx4090x1", finetuning_type="auto", cutoff_len=2048)
    assert gamer.fits and gamer.finetuning_type == "lora"
    explicit = _plan("Llama-3.1-8B", "a6000x1", finetuning_type="full", allow_fallback=True, cutoff_len=2048)
    assert explicit.finetuning_type == "lora" and any("full needs" in r for r in explicit.reasons)


def test_without_fallback_the_plan_says_it_does_not_fit_and_what_would():
    plan = _plan("Llama-3.1-70B", "a6000x1", finetuning_type="lora", cutoff_len=1024)
    assert not plan.fits and "quantization_bit: 4 would fit" in plan.suggestion
    assert plan.per_gpu_memory_gib > plan.gpu_memory_gib


def test_checkpointing_is_the_plans_choice_unless_the_config_sets_it():
    roomy = _plan("Llama-3.1-8B", "h200x8", finetuning_type="lora", cutoff_len=1024)
    assert not roomy.gradient_checkpointing and any("checkpointing off" in r for r in roomy.reasons)
    tight = _plan("Llama-3.1-8B", "rtx4090x1", finetuning_type="lora", quantization_bit=4, cutoff_len=4096)
    assert tight.gradient_checkpointing and any("without it" in r for r in tight.reasons)
    forced = _plan(
        "Llama-3.1-8B", "h200x8", finetuning_type="lora", cutoff_len=1024, disable_gradient_checkpointing=False
    )
    assert forced.gradient_checkpointing and any("as the config says" in r for r in forced.reasons)


def test_every_memory_term_is_reported_and_sums_to_the_total():
    plan = _plan("Llama-3.1-8B", "a100-80gbx8", finetuning_type="full", cutoff_len=2048)
    terms = {k: v for k, v in plan.memory_gib.items() if k != "total"}
    assert {"weights", "gathered_layers", "optimizer", "activations", "logits", "runtime"} <= set(terms)
    assert sum(terms.values()) == pytest.approx(plan.memory_gib["total"], abs=0.01)
    dpo = load_config(ROOT / "examples/tiny/dpo_lora.yaml", [f"model_name_or_path={CONFIGS / 'Llama-3.1-8B'}"])
    dpo.finetuning.finetuning_type = "full"
    with_ref = make_plan(dpo, load_profile("h100x8"), get_stage("dpo"), launching=False)
    assert with_ref.memory_gib["reference_model"] > 0 and with_ref.memory_gib["reference_logits"] > 0


def test_plan_json_has_the_documented_fields_and_exits_0_when_it_does_not_fit(capsys):
    args = [f"model_name_or_path={CONFIGS / 'Llama-3.1-405B'}", "finetuning_type=full", "cutoff_len=1024"]
    assert main(["plan", str(SFT), *args, "--profile", "a6000x1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    fields = {"num_params", "trainable_params", "launcher", "strategy", "finetuning_type", "quantization_bit"}
    fields |= {"gradient_checkpointing", "world_size", "per_gpu_memory_gib", "gpu_memory_gib", "fits"}
    assert fields | {"max_cutoff_len", "reasons"} <= set(plan)
    assert plan["fits"] is False and plan["quantization_bit"] is None and plan["max_cutoff_len"] == 0
    assert main(["plan", str(SFT), *args, "--profile", "h100x8", "--nnodes", "2"]) == 0
    assert "torchrun ×16" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "a6000"], "--profile: unknown profile 'a6000'"),
        (
            ["model_name_or_path=/nonexistent"],
            "model_name_or_path: '/nonexistent' is not a folder, nor a hub model name",
        ),
        (
            [
                f"model_name_or_path={CONFIGS / 'Llama-3.1-405B'}",
                f"ref_model={CONFIGS / 'Llama-3.1-405B'}",
                "stage=dpo",
                "dataset=ranking_demo",
                "finetuning_type=auto",
                "--profile",
                "a6000x1",
            ],
            "finetuning_type auto: stage dpo needs a frozen reference model",
        ),
    ],
)
def test_bad_planner_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["plan", str(SFT), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_model_folder_without_config_json_is_one_line(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    assert main(["plan", str(SFT), f"model_name_or_path={tmp_path / 'weights'}"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_train_refuses_a_plan_that_cannot_fit_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["train", str(SFT), *base_overrides(out, model_name_or_path=CONFIGS / "Llama-3.1-70B", finetuning_type="full")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lf-dist: error: plan: full needs "), err
    assert "GiB per device, this machine has" in err[-1] and not out.exists()


def test_env_reports_this_machine_and_the_backends(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["profile"]["cpu_cores"] >= 1 and info["profile"]["ram_gib"] > 0
    assert set(info["backends"]) == {"deepspeed", "ray", "megatron-core", "liger-kernel", "flash-attn", "bitsandbytes"}
    assert info["backends"]["deepspeed"] and info["backends"]["bitsandbytes"]  # the dev extra installs both
    software = info["software"]  # what llamafactory-cli env prints for a bug report
    assert {"lf-dist", "Python", "OS", "torch", "transformers", "peft", "datasets", "accelerate"} <= set(software)
    import platform

    import torch

    assert software["Python"] == platform.python_version() and software["torch"].startswith(torch.__version__)


def test_train_writes_the_plan_it_ran_and_logs_planned_next_to_measured_peak(make_cfg):
    from lf_dist.worker import run

    cfg = make_cfg(max_steps=3)
    run(cfg)
    out = __import__("pathlib").Path(cfg.train.output_dir)
    plan = json.loads((out / "run_plan.json").read_text(encoding="utf-8"))
    assert plan["fits"] and plan["finetuning_type"] == "lora" and plan["gradient_checkpointing"] is False
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(e["planned_peak_memory_gb"] > 0 and e["peak_memory_gb"] > 0 for e in log if "loss" in e)


def test_tiny_model_plan_matches_the_model_it_builds():
    cfg = load_config(SFT, [f"model_name_or_path={TINY_MODEL}"])
    plan = make_plan(cfg, load_profile("cpu"), get_stage("sft"), launching=False)
    assert plan.num_params == 427_488 and plan.trainable_params == 27_648  # as the run logs them


@pytest.mark.parametrize("model", ["Llama-3.2-1B", "Qwen2.5-0.5B"])
@pytest.mark.parametrize(
    "keys", [{}, {"use_dora": True}, {"lora_target": "q_proj,v_proj"}, {"additional_target": "embed_tokens"}]
)
def test_lora_counted_on_one_layer_equals_peft_on_the_whole_model(model, keys):
    """The planner counts LoRA on a one-layer copy (a 405B plan in seconds); peft on every layer agrees."""
    import copy

    from lf_dist.model.heads import CAUSAL_LM, SEQUENCE_SCORE
    from lf_dist.planner.model_size import _trainable, meta_model, trainable_params

    cfg = load_config(SFT, [f"{k}={v}" for k, v in keys.items()])
    config = read_model_config(str(CONFIGS / model))
    for head in (CAUSAL_LM, SEQUENCE_SCORE):
        whole = copy.deepcopy(cfg)
        whole.finetuning.disable_gradient_checkpointing = True
        assert trainable_params(config, head, cfg, "lora") == _trainable(meta_model(config, head), whole, head)


def test_the_plan_reports_the_most_rank_length_and_batch_that_fit_each_at_its_edge():
    plan = _plan("Llama-3.1-8B", "a6000x1", finetuning_type="lora", cutoff_len=2048, lora_rank=8)
    assert plan.fits and plan.max_lora_rank & (plan.max_lora_rank - 1) == 0  # a power of two
    assert "most that fits with lora: lora_rank" in plan.most_that_fits()
    gc = {"disable_gradient_checkpointing": False}  # the most that fits is reckoned with checkpointing on
    for key, top, above in (
        ("lora_rank", plan.max_lora_rank, 2 * plan.max_lora_rank),
        ("cutoff_len", plan.max_cutoff_len, plan.max_cutoff_len + 1),
        ("per_device_train_batch_size", plan.max_batch_size, plan.max_batch_size + 1),
    ):
        base = {"finetuning_type": "lora", "cutoff_len": 2048, "lora_rank": 8, **gc}
        assert _plan("Llama-3.1-8B", "a6000x1", **{**base, key: top}).fits, key
        assert not _plan("Llama-3.1-8B", "a6000x1", **{**base, key: above}).fits, key


def test_advice_names_the_first_change_that_fits_and_never_a_tiny_cutoff():
    big_rank = _plan("Llama-3.1-70B", "a6000x1", finetuning_type="auto", lora_rank=256, cutoff_len=1024)
    assert not big_rank.fits and big_rank.suggestion.startswith("lora_rank: 32 would fit with 4-bit QLoRA")
    assert _plan("Llama-3.1-70B", "a6000x1", finetuning_type="auto", lora_rank=32, cutoff_len=1024).fits
    batch = _plan("Llama-3.1-70B", "a6000x1", finetuning_type="lora", cutoff_len=1024, per_device_train_batch_size=8)
    assert batch.suggestion.startswith(
        "finetuning_type: lora with quantization_bit: 4 and per_device_train_batch_size: 2 with "
        "gradient_accumulation_steps: 8"  # 2 × 8 / 2: the YAML accumulates 2 micro-batches of 8
    )
    # 405B LoRA on one node: QLoRA comes before offload in the advice, and with NF4 sharded over 8 ranks it fits
    qlora = _plan("Llama-3.1-405B", "h100x8", finetuning_type="lora", cutoff_len=1024)
    assert qlora.suggestion.startswith("finetuning_type: lora with quantization_bit: 4 would fit")
    # 70B QLoRA on two 24 GB cards: the sharded NF4 base is offloaded (as Answer.AI's FSDP-QLoRA runs it)
    offload = _plan("Llama-3.1-70B", "rtx4090x2", finetuning_type="lora", quantization_bit=4, cutoff_len=1024)
    assert offload.suggestion.startswith("fsdp_cpu_offload: true would fit")  # 38 of 128 GiB of RAM
    assert _plan(
        "Llama-3.1-70B",
        "rtx4090x2",
        finetuning_type="lora",
        quantization_bit=4,
        cutoff_len=1024,
        fsdp_cpu_offload=True,
    ).fits
    gpus = _plan("Qwen2.5-72B", "rtx4090x1", finetuning_type="full", cutoff_len=1024)  # 64 GiB RAM: no offload
    # the fewest cards: QLoRA with its NF4 base sharded over 4 (LoRA would take 32)
    assert gpus.suggestion.startswith(
        "finetuning_type: lora with quantization_bit: 4, 4 × NVIDIA GeForce RTX 4090 (4 nodes of 1, "
    )
    tight = _plan("Qwen2.5-72B", "rtx4090x1", finetuning_type="lora", quantization_bit=4, cutoff_len=1024)
    assert not tight.fits and "cutoff_len" not in tight.suggestion  # what fits there is far below 256 tokens


def test_offloading_plans_check_the_nodes_ram():
    ds = {"deepspeed": ROOT / "examples" / "deepspeed" / "ds_z3_offload_config.json", "finetuning_type": "lora"}
    big = _plan("Llama-3.1-70B", "a6000x1", cutoff_len=1024, **ds)
    assert big.memory_gib["total"] < big.gpu_memory_gib  # the GPU would do ...
    assert not big.fits and big.host_memory_gib > 128  # ... but ~131 GiB of bf16 weights exceed 128 GiB of RAM
    assert any("GiB of RAM per node > 90% of 128 GiB" in r for r in big.reasons)
    assert "quantization_bit: 4 and no deepspeed config" in big.suggestion
    small = _plan("Llama-3.1-8B", "a6000x1", cutoff_len=1024, **ds)
    assert small.fits and 15 < small.host_memory_gib < 0.9 * 128
