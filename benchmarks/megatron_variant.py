"""gpu_throughput.py's `megatron` variant: lf-dist's MegatronStrategy at TP = PP = 1 on one GPU (megatron-core's
GPTModel and layers, its DDP and optimizer, the step's schedule and vocab-parallel cross-entropy), built from the
same random-init config. Without Transformer Engine the packed row is one causal sequence (documents see each
other: megatron-core runs packed sequences on TE only); the attention FLOPs are the same."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(spec: dict, device: torch.device, bf16: bool = True):
    """(the strategy, its model and optimizer) for `spec`, weights initialized by megatron-core on the GPU."""
    from transformers import LlamaConfig

    from lf_dist.parallel.megatron.model_map import build_model_chunks
    from lf_dist.parallel.megatron.strategy import MegatronStrategy
    from lf_dist.run_checks import load_config

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    keys = {
        "model_name_or_path": str(ROOT / "examples/tiny/model"),  # the tokenizer only; the model is `spec`'s
        "dataset": "alpaca_demo",
        "dataset_dir": str(ROOT / "examples/data"),
        "template": "chatml",
        "output_dir": tempfile.mkdtemp(),
        "strategy": "megatron",
        "bf16": bf16,
        "learning_rate": 1e-5,
        "finetuning_type": "lora" if spec["lora"] else "full",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_target": "all",
    }
    strategy = MegatronStrategy(load_config(None, [f"{k}={v}" for k, v in keys.items()]))
    s = {k: v for k, v in spec.items() if k not in ("lora", "seq")}
    strategy.hf_config = LlamaConfig(**s, max_position_embeddings=spec["seq"])
    strategy.tconfig = strategy.transformer_config(strategy.hf_config)
    strategy.tconfig.perform_initialization, strategy.tconfig.use_cpu_initialization = True, False
    torch.manual_seed(0)
    chunks = [chunk.to(device) for chunk in build_model_chunks(strategy.hf_config, strategy.tconfig)]
    if spec["lora"]:
        strategy._apply_lora(chunks)
    model, optimizer = strategy.setup(chunks, None)
    return strategy, model, optimizer


def step(strategy, model, optimizer, batch: dict) -> None:
    from lf_dist.train.losses import CausalLMLoss

    loss = CausalLMLoss()
    strategy.forward_backward(model, [batch], loss, loss.num_units(batch))
    strategy.step(model, optimizer, 1.0)
