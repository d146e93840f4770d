"""`lf-dist env --calibrate`: measure this machine's rates for the time model and write them as a profile.

Measured: the matmul rate of a training matmul with both its gradients (fp32 and bf16 at a large width, fp32 at
width 256 too: how fast it falls for narrow models), causal attention's, a rank-8 LoRA pair's and the output
layer's (in lf-dist's chunked cross-entropy) rates, the
elementwise rate (a layer's operators between the matmuls and a log-softmax, in the bytes the time model counts
for them), the optimizer's update (fused, and multi-tensor as DeepSpeed runs it), the time of one small operator
with its autograd, a decoder layer's fixed cost (a tiny Llama's, with and without LoRA), DeepSpeed's own work per
trainable value, and the all-reduce, all-gather and reduce-scatter bandwidths and the latency between two
processes on this machine (gloo on a CPU, NCCL across two GPUs; a single GPU keeps its published link figures).
Everything runs on 127.0.0.1 and in spawned processes (no fork), as on Windows.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

from lf_dist.planner.profiles import HardwareProfile, detect
from lf_dist.planner.timing import median_rate, synchronizer


def matmul_tflops(dtype, device, width: int = 2048, rows: int = 2048) -> float:
    """A training matmul: [rows × width] @ [width × width] forward, then both of its gradients (the transposed
    operands a backward multiplies), in `dtype`."""
    import torch

    sync = synchronizer(device)
    x = torch.randn(rows, width, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(width, width, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(rows, width, dtype=dtype, device=device)

    def work():
        (x @ w).backward(grad)
        x.grad = w.grad = None
        sync()

    return median_rate(work, 3 * 2.0 * rows * width * width) / 1e12


def half_width(rate_narrow: float, rate_wide: float, narrow: int, wide: int) -> float:
    """w0 of rate(w) = R·w / (w + w0), from the rates at two widths: small matmuls reach less of the peak."""
    ratio = rate_narrow / max(rate_wide, 1e-12)  # (narrow / (narrow + w0)) / (wide / (wide + w0))
    if ratio >= 1.0:
        return 0.0
    return max(0.0, narrow * wide * (1 - ratio) / (ratio * wide - narrow))


def elementwise_gbps(device, hidden: int = 256, intermediate: int = 688, vocab: int = 16384) -> float:
    """The rate of the work between the matmuls, in the time model's own accounting (`step_time`): a decoder
    layer's elementwise operators as Hugging Face's Llama runs them (RMSNorms upcast to fp32, residual adds, rotary
    on q, SwiGLU) and a log-softmax over a vocabulary, forward and backward, on 2,048 tokens; the bytes the model
    counts for them over the time they take. A GPU runs them near its memory bandwidth; a CPU core computes
    exponentials and reductions slower than it streams memory, which this measures."""
    import torch
    from torch.nn.functional import silu

    from lf_dist.planner import step_time as st

    tokens, sync = 2048, synchronizer(device)
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    weight = torch.ones(hidden, device=device, requires_grad=True)
    gate = torch.randn(tokens, intermediate, device=device, requires_grad=True)
    up = torch.randn(tokens, intermediate, device=device, requires_grad=True)
    logits = torch.randn(tokens // 8, vocab, device=device, requires_grad=True)
    cos, sin = torch.randn(tokens, hidden, device=device), torch.randn(tokens, hidden, device=device)

    def norm(h):
        return weight * (h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6))

    def work():
        h = x + norm(x)
        h = h + norm(h)
        half = hidden // 2
        q = h * cos + torch.cat((-h[:, half:], h[:, :half]), dim=-1) * sin
        mlp = silu(gate) * up
        ce = torch.log_softmax(logits, dim=-1)[:, 0]
        (q.sum() + mlp.sum() + ce.sum()).backward()
        for t in (x, weight, gate, up, logits):
            t.grad = None
        sync()

    layer = st.HIDDEN_PASSES * hidden + st.QKV_PASSES * hidden + st.INTERMEDIATE_PASSES * 2 * intermediate
    counted = 4 * tokens * layer * (1 + st.BACKWARD_ELEMENTWISE) + 4 * st.VOCAB_PASSES * vocab * tokens // 8
    return median_rate(work, counted) / 1e9


def optimizer_gbps(device, n: int = 4 * 2**20, fused: bool = True) -> float:
    """The update a step ends with, as lf-dist runs it (clip the gradients' norm, AdamW fused or multi-tensor as
    DeepSpeed is given it, gradients set to None), in the time model's bytes per trainable value
    (`step_time.OPTIMIZER_BYTES`)."""
    import torch

    from lf_dist.planner import step_time as st

    params = [torch.nn.Parameter(torch.randn(n // 4, device=device)) for _ in range(4)]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    sync = synchronizer(device)

    def work():
        for param in params:
            param.grad = torch.randn_like(param)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    grads = median_rate(lambda: ([torch.randn_like(q) for q in params], sync()), 1.0)  # the gradients' making
    return st.OPTIMIZER_BYTES * n / (1 / median_rate(work, 1.0) - 1 / grads) / 1e9


def attention_tflops(dtype, device, rows: int = 2, heads: int = 4, seq: int = 512, head_dim: int = 64) -> float:
    """Causal attention (torch's scaled_dot_product_attention, as the models run it) with its backward, in the
    time model's FLOPs (`step_time.flop_terms`: 4·seq·heads·head_dim per token forward, half of it causal, the
    backward twice that)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    sync = synchronizer(device)
    q, k, v = (torch.randn(rows, heads, seq, head_dim, dtype=dtype, device=device, requires_grad=True) for _ in "qkv")
    grad = torch.randn(rows, heads, seq, head_dim, dtype=dtype, device=device)

    def work():
        sdpa(q, k, v, is_causal=True).backward(grad)
        q.grad = k.grad = v.grad = None
        sync()

    return median_rate(work, 3 * 0.5 * 4.0 * seq * heads * head_dim * rows * seq) / 1e12


def adapter_tflops(dtype, device, rank: int = 8, width: int = 1024, tokens: int = 2048) -> float:
    """A LoRA pair at rank 8 ([tokens × width] @ A [width × r] @ B [r × width]) with its input and weight
    gradients: narrow matmuls run far below a wide one's rate."""
    import torch

    sync = synchronizer(device)
    x = torch.randn(tokens, width, dtype=dtype, device=device, requires_grad=True)
    a = torch.randn(width, rank, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(rank, width, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(tokens, width, dtype=dtype, device=device)

    def work():
        ((x @ a) @ b).backward(grad)
        x.grad = a.grad = b.grad = None
        sync()

    return median_rate(work, 3 * 2.0 * rank * 2 * width * tokens) / 1e12


def head_tflops(device, bandwidth_gbps: float, hidden: int = 256, vocab: int = 16384, tokens: int = 1024) -> float:
    """The output layer's matmuls as lf-dist's chunked cross-entropy runs them (`kernels/cross_entropy.py`, a
    trained weight: logits, d hidden, the backward's logits again and the weight gradient), in FLOP/s: the kernel's
    time less its passes over the vocabulary at the measured elementwise rate. Interleaved with those passes, on
    chunks of tokens against a [vocab × hidden] weight, they run below a lone matmul's rate."""
    import torch

    from lf_dist.kernels.cross_entropy import linear_logps
    from lf_dist.planner import step_time as st

    sync = synchronizer(device)
    hidden_states = torch.randn(tokens, hidden, device=device, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden, device=device) * 0.02)
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def work():
        linear_logps(hidden_states, weight, None, targets).sum().backward()
        hidden_states.grad = weight.grad = None
        sync()

    seconds = 1.0 / median_rate(work, 1.0)
    passes = st.VOCAB_PASSES + st.VOCAB_BACKWARD_PASSES + 3 * hidden / st.chunk_size(vocab)
    elementwise = 4 * vocab * passes * tokens / (bandwidth_gbps * 1e9)
    return 4 * 2.0 * hidden * vocab * tokens / max(seconds - elementwise, seconds / 4) / 1e12


def fresh_memory_gbps(mib: int = 64) -> float:
    """A CPU's rate of first touch of newly mapped memory: zeros into a new 64 MiB tensor (the allocator maps blocks
    this large anew each time) against zeros into a kept one; the difference is the page faults."""
    import torch

    n = mib * 2**20 // 4
    kept = torch.zeros(n)
    fresh = 1.0 / median_rate(lambda: torch.zeros(n), 1.0)
    warm = 1.0 / median_rate(kept.zero_, 1.0)
    return n * 4 / max(fresh - warm, 1e-9) / 1e9


def layer_overhead_us(device, lora: bool) -> float:
    """A decoder layer's fixed cost per micro-batch, forward and backward: a tiny Llama (width 32, 16 tokens: its
    arithmetic is nothing) with 6 layers against 2, LoRA on every linear as lf-dist runs it (`kernels/lora.py`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def step_time(layers: int) -> float:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, attn_implementation="sdpa",
        )  # fmt: skip
        model = LlamaForCausalLM(cfg).to(device)
        if lora:
            from peft import LoraConfig, get_peft_model

            from lf_dist.kernels import lora as lean

            model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
            lean.apply(model)
        ids = torch.randint(0, 64, (1, 16), device=device)
        sync = synchronizer(device)

        def work():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
            sync()

        return 1.0 / median_rate(work, 1.0)

    return max(0.0, (step_time(6) - step_time(2)) / 4 * 1e6)


def op_latency_us(device) -> float:
    """One small operator with its backward, as a step's many small ones cost."""
    import torch

    x = torch.randn(64, device=device, requires_grad=True)
    sync = synchronizer(device)

    def work():
        y = x
        for _ in range(20):
            y = y * 1.0001
        y.sum().backward()
        sync()

    return 1e6 / median_rate(work, 42.0)


def _kernel_rates(hw: HardwareProfile, device, report) -> dict:
    """The rates of a step's work on one device: matmuls, elementwise, optimizer, attention, LoRA, fixed costs."""
    import torch

    wide = 8192 if hw.on_gpu else 2048
    fp32 = matmul_tflops(torch.float32, device, wide)
    narrow = matmul_tflops(torch.float32, device, 256)
    report(f"matmul fp32: {fp32:.3f} TFLOP/s ({narrow:.3f} at width 256)")
    bf16 = matmul_tflops(torch.bfloat16, device, wide) if hw.bf16 else 0.0
    report(f"matmul bf16: {bf16:.3f} TFLOP/s")
    bandwidth = elementwise_gbps(device)
    report(f"elementwise: {bandwidth:.1f} GB/s")
    update, unfused = optimizer_gbps(device), optimizer_gbps(device, fused=False)
    report(f"optimizer update: {update:.1f} GB/s fused, {unfused:.1f} GB/s multi-tensor")
    dtype = torch.bfloat16 if hw.on_gpu else torch.float32
    attention, adapter = attention_tflops(dtype, device), adapter_tflops(dtype, device)
    head = head_tflops(device, bandwidth)
    report(f"causal attention: {attention:.3f} TFLOP/s; LoRA rank 8: {adapter:.3f}; output layer: {head:.3f}")
    latency = op_latency_us(device)
    layer, lora_layer = layer_overhead_us(device, lora=False), layer_overhead_us(device, lora=True)
    report(f"operator with autograd: {latency:.1f} µs; a decoder layer: {layer:.0f} µs, with LoRA {lora_layer:.0f} µs")
    rates = {
        "memory_gbps": round(bandwidth, 2),
        "optimizer_gbps": round(update, 2),
        "unfused_optimizer_gbps": round(unfused, 2),
        "attention_tflops": round(attention, 4),
        "adapter_tflops": round(adapter, 4),
        "head_tflops": round(head, 4),
        "op_latency_us": round(latency, 2),
        "layer_overhead_us": round(layer, 1),
        "lora_layer_overhead_us": round(lora_layer, 1),
        "matmul_half_width": round(half_width(narrow, fp32, 256, wide), 1),
    }
    if hw.on_gpu:  # the published peaks stay; what a large matmul reaches of them is measured
        rates["matmul_efficiency"] = round(bf16 / hw.peak_bf16_tflops, 3) if hw.peak_bf16_tflops else 1.0
        rates["peak_bf16_tflops"] = hw.peak_bf16_tflops or round(bf16, 3)
    else:  # a CPU has no published peak: the measured rates are the peaks
        rates.update(peak_bf16_tflops=round(bf16, 4), peak_fp32_tflops=round(fp32, 4), matmul_efficiency=1.0)
    return rates


def _process_rates(hw: HardwareProfile, report) -> dict:
    """What takes more than one process: collectives between two, and DeepSpeed's engine (CPU machines: on a GPU
    its copies are kernels among thousands, which the bandwidth prices)."""
    from lf_dist.planner import calibrate_spawned as spawned

    rates = {}
    if not hw.on_gpu:
        rates["fresh_memory_gbps"] = round(fresh_memory_gbps(), 2)
        report(f"first touch of new memory: {rates['fresh_memory_gbps']:.1f} GB/s")
        rates["deepspeed_ns_per_value"] = round(spawned.deepspeed_ns_per_value(), 3)
        report(f"DeepSpeed's step beyond torch's: {rates['deepspeed_ns_per_value']:.2f} ns per trainable value")
    if not hw.on_gpu or hw.gpus_per_node > 1:
        bus, gather, scatter, hop = spawned.collectives("nccl" if hw.on_gpu else "gloo")
        report(
            f"{'nccl' if hw.on_gpu else 'gloo'}, 2 processes: all-reduce {bus:.2f} GB/s, {hop:.0f} µs; all-gather "
            f"{gather:.2f} GB/s; reduce-scatter {scatter:.2f} GB/s"
        )
        rates.update(intra_node_gbps=round(bus, 3), collective_latency_us=round(hop, 1))
        rates.update(all_gather_gbps=round(gather, 3), reduce_scatter_gbps=round(scatter, 3))
    return rates


def calibrate(report=print) -> HardwareProfile:
    """This machine's profile with its measured rates."""
    import torch

    hw = detect()
    device = torch.device("cuda" if hw.on_gpu else "cpu")
    changes = {**_kernel_rates(hw, device, report), **_process_rates(hw, report)}
    return replace(hw, name=f"calibrated {hw.gpu or 'cpu'}", **changes)


def write_profile(hw: HardwareProfile, path: Path) -> Path:
    """The profile as YAML that `--profile FILE` reads (written whole, then moved into place)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(asdict(hw), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
