"""strategy megatron on a CUDA GPU, without the CPU shim: megatron-core's own forward matches Hugging Face's in
bf16, 20 sft steps (full and LoRA) track the FSDP2 path's losses, the distributed optimizer steps as the plain one,
and Transformer Engine's layer spec runs where TE is installed. One GPU, TP = PP = 1 (benchmarks/gpu_session.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_MODEL

pytestmark = pytest.mark.cuda


def _train(out: Path, *overrides: str, config: str = "sft_full.yaml") -> list[float]:
    """`lf-dist train` in one process, as a user runs it; the logged losses."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(ROOT / "examples/tiny" / config), f"output_dir={out}"]
        + ["max_steps=20", "logging_steps=1", "save_steps=1000", "eval_strategy=no", "val_size=0", "bf16=true"]
        + ["disable_tqdm=true", "report_to=none", *overrides],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_megatron_forward_of_the_converted_model_matches_hf_in_bf16():
    from megatron.core import parallel_state, tensor_parallel
    from transformers import AutoConfig, AutoModelForCausalLM

    from lf_dist.parallel.megatron.model_map import build_model_chunks, transformer_config
    from lf_dist.parallel.megatron.weights import load_hf_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        hf_config = AutoConfig.from_pretrained(TINY_MODEL)
        tconfig = transformer_config(hf_config, tp=1, pp=1, params_dtype=torch.bfloat16, bf16=True)
        (chunk,) = build_model_chunks(hf_config, tconfig)
        chunk.cuda()
        load_hf_weights([chunk], hf_config, TINY_MODEL)
        hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).cuda()
        ids = torch.randint(3, hf_config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
        positions = torch.arange(64, device="cuda").expand(2, 64)
        with torch.no_grad():
            ours = chunk(ids, positions, None)[..., : hf_config.vocab_size].float().log_softmax(-1)
            theirs = hf(input_ids=ids).logits.float().log_softmax(-1)
        diff = (ours - theirs).abs()
        assert float(diff.mean()) < 5e-3 and float(diff.max()) < 0.1
        assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) > 0.98
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_twenty_full_sft_steps_track_the_fsdp2_path(tmp_path):
    ours = _train(tmp_path / "megatron", "strategy=megatron")
    theirs = _train(tmp_path / "fsdp2", "strategy=fsdp2")
    assert len(ours) == len(theirs) == 20
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-2, (ours, theirs)


def _shared_a_adapter(path: Path) -> Path:
    """A peft adapter whose fused groups (q/k/v, gate/up) share lora_A, B = 0: where both backends start."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for layer in model.base_model.model.model.layers:
            for group in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
                first = getattr(group[0], group[1][0]).lora_A["default"].weight
                for name in group[1][1:]:
                    getattr(group[0], name).lora_A["default"].weight.copy_(first)
    model.save_pretrained(path)
    return path


def test_twenty_lora_sft_steps_track_the_fsdp2_path(tmp_path):
    adapter = f"adapter_name_or_path={_shared_a_adapter(tmp_path / 'start')}"
    ours = _train(tmp_path / "megatron", "strategy=megatron", adapter, config="sft_lora.yaml")
    theirs = _train(tmp_path / "fsdp2", "strategy=fsdp2", adapter, config="sft_lora.yaml")
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-2, (ours, theirs)


def test_a_distributed_optimizer_step_equals_the_plain_optimizers(tmp_path):
    plain = _train(tmp_path / "plain", "strategy=megatron", "bf16=false", "use_distributed_optimizer=false")
    sharded = _train(tmp_path / "sharded", "strategy=megatron", "bf16=false", "use_distributed_optimizer=true")
    assert sharded == pytest.approx(plain, rel=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None,
    reason="Transformer Engine is not installed: the TE layer spec (and with it sequence parallelism, packed rows "
    "and context parallelism) is not exercised",
)
def test_the_transformer_engine_spec_trains_as_the_local_one(tmp_path):
    ours = _train(tmp_path / "te", "strategy=megatron", "max_steps=5")
    theirs = _train(tmp_path / "fsdp2", "strategy=fsdp2", "max_steps=5")
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-2, (ours, theirs)
