"""Training throughput and MFU per variant on one GPU (random-init models from config, no downloads), JSON lines.

    python benchmarks/gpu_throughput.py [--models 1b,3b,8b-lora] [--steps 10] [--warmup 3]
    python benchmarks/gpu_throughput.py --smoke        # tiny config on CPU: the CI smoke test

Variants, each adding one thing to the one before:
  hf_loop   the model's own loss (full [tokens × vocab] logits), sdpa with the block mask transformers builds
            from restarting position_ids, torch AdamW (foreach) — a Hugging Face Trainer-style step;
  lf-dist   lf-dist's step (`CausalLMLoss`): label-position chunked cross-entropy, fused AdamW, lean LoRA
            layers (same sdpa);
  +liger    Liger's RMSNorm / RoPE / SwiGLU and fused linear cross-entropy (CUDA only);
  +varlen   varlen attention over the packed documents (torch's kernel, no mask);
  +compile  torch.compile of each decoder block;
  megatron  strategy megatron at TP = PP = 1 instead (benchmarks/megatron_variant.py: megatron-core's layers, its
            DDP and optimizer, lf-dist's schedule-driven step; CUDA only).
Batches are packed rows of documents with long-tailed lengths (8,192 tokens; 4,096 for the 8B LoRA case), bf16.

MFU = tokens/s × FLOPs per token / peak, with torchtitan's FLOPs per token: 6·(N − N_embedding) + 12·L·H·Q·T
for full fine-tuning (L layers, H heads, Q head dim, T sequence length), and 4·(N − N_embedding) + 12·L·H·Q·T
for LoRA (no weight gradients for the frozen base). Two peaks are stated: a measured bf16 matmul on the device,
and the datasheet's dense bf16 figure when the device is known.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("hf_loop", "lf-dist", "+liger", "+varlen", "+compile", "megatron")
MODELS = {  # Llama-3 style shapes
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, lora=False, seq=256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, lora=False, seq=8192),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, lora=False, seq=8192),
    "1b-lora": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, lora=True, seq=8192),
    "8b-lora": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, lora=True, seq=4096),
}  # fmt: skip
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A6000": 155e12, "4090": 165e12}


def measured_peak(device: torch.device) -> float:
    """bf16 matmul FLOP/s on this device (8192³ on CUDA, 2048³ on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def packed_batch(seq: int, vocab: int, seed: int) -> dict:
    """One row of documents end to end: restarting positions, every token a label (pretraining-style)."""
    from lf_dist.data.collator import Collator

    rng, docs, left = random.Random(seed), [], seq
    while left > 0:
        n = min(left, max(16, int(rng.paretovariate(1.2) * 256)))
        docs.append([rng.randrange(3, vocab) for _ in range(n)])
        left -= n
    rows = [{"input_ids": d, "labels": d} for d in docs]
    return Collator(0, padding_free=True)(rows)  # [1, seq], position_ids, cu_seq_lens


def build(spec: dict, variant: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lf_dist.kernels.attention import register

    s = {k: v for k, v in spec.items() if k not in ("lora", "seq")}
    attn = register() if variant in ("+varlen", "+compile") else "sdpa"
    config = LlamaConfig(**s, max_position_embeddings=spec["seq"], attn_implementation=attn)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    if variant in ("+liger", "+varlen", "+compile") and device.type == "cuda":
        from lf_dist.kernels import liger

        liger.apply(model)
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if variant != "hf_loop":  # lf-dist's LoRA layers (the plan's default)
            from lf_dist.kernels import lora

            lora.apply(model)
    if variant == "+compile":
        from lf_dist.parallel.base import compile_blocks

        compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = variant != "hf_loop"
    opt = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if fused else {"foreach": True}))
    return model, opt


def step(model, opt, batch: dict, variant: str) -> None:
    from lf_dist.train.losses import CausalLMLoss

    if variant == "hf_loop":
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        loss = model(**inputs, labels=batch["labels"], use_cache=False).loss
    else:
        loss = CausalLMLoss()(model, batch)[0] / CausalLMLoss.num_units(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def flops_per_token(spec: dict) -> float:
    h, layers, vocab = spec["hidden_size"], spec["num_hidden_layers"], spec["vocab_size"]
    heads, kv, inter = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
    head_dim = h // heads
    per_layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * inter  # q, o, k, v, gate/up/down
    dense = layers * per_layer + vocab * h  # the output layer counts; the embedding lookup does not
    return (4 if spec["lora"] else 6) * dense + 12 * layers * heads * head_dim * spec["seq"]


def _builder(spec: dict, variant: str, device):
    """(model, optimizer, step function) of a variant."""
    if variant == "megatron":
        import megatron_variant

        strategy, model, opt = megatron_variant.build(spec, device)
        return model, opt, lambda m, o, b, v: megatron_variant.step(strategy, m, o, b)
    model, opt = build(spec, variant, device)
    return model, opt, step


def run_variant(name: str, spec: dict, variant: str, device, args, peaks) -> dict:
    model, opt, step = _builder(spec, variant, device)
    batches = [
        {k: v.to(device) for k, v in packed_batch(spec["seq"], spec["vocab_size"], s).items()}
        for s in range(args.warmup + args.steps)
    ]
    for b in batches[: args.warmup]:
        step(model, opt, b, variant)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in batches[args.warmup :]:
        step(model, opt, b, variant)
    _sync(device)
    seconds = time.perf_counter() - start
    tps = spec["seq"] * args.steps / seconds
    fpt = flops_per_token(spec)
    out = {
        "bench": "gpu_throughput",
        "model": name,
        "method": "lora" if spec["lora"] else "full",
        "variant": variant,
        "seq_len": spec["seq"],
        "tokens_per_s": round(tps, 1),
        "mfu_measured_peak": round(tps * fpt / peaks[0], 4),
        "mfu_datasheet_peak": round(tps * fpt / peaks[1], 4) if peaks[1] else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1b,3b,1b-lora,8b-lora")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="the tiny config on CPU, 2 steps (CI)")
    args = p.parse_args()
    if args.smoke:
        args.models, args.steps, args.warmup = "tiny", 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    peaks = (measured_peak(device), datasheet_peak(device))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    head = {"bench": "gpu_throughput", "device": name, "torch": torch.__version__}
    print(json.dumps({**head, "measured_bf16_flops": round(peaks[0]), "datasheet_bf16_flops": peaks[1]}), flush=True)
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            if variant in ("+liger", "megatron") and device.type != "cuda":
                why = "Liger's Triton kernels" if variant == "+liger" else "megatron-core's layers"
                print(json.dumps({"bench": "gpu_throughput", "model": model, "variant": variant,
                                  "skipped": f"{why} need CUDA"}), flush=True)  # fmt: skip
                continue
            print(json.dumps(run_variant(model, MODELS[model], variant, device, args, peaks)), flush=True)


if __name__ == "__main__":
    main()
