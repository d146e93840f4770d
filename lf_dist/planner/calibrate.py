"""`lf-dist env --calibrate`: measure this machine's rates for the time model and write them as a profile.

Measured: the matmul rate of a training matmul with both its gradients (fp32 and bf16 at a large width, fp32 at
width 256 too: how fast it falls for narrow models), the elementwise rate (a layer's operators between the
matmuls and a log-softmax, in the bytes the time model counts for them), the optimizer's update, the time of one
small operator with its autograd (what a step pays per operator however small), and the all-reduce bandwidth and
latency between two processes on this machine (gloo on a CPU, NCCL across two GPUs; a single GPU keeps its
published link figures). Everything runs on 127.0.0.1 and in spawned processes (no fork), as on Windows.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from lf_dist.planner.profiles import HardwareProfile, detect

SECONDS = 0.4  # per measurement; each is the best of three such windows


def _best_rate(work, units: float) -> float:
    """Units per second of `work()`, the best of three windows (the fastest is the least disturbed)."""
    work()
    best = 0.0
    for _ in range(3):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < SECONDS:
            work()
            n += 1
        best = max(best, units * n / (time.perf_counter() - start))
    return best


def _fixed_rate(work, units: float, n: int) -> float:
    """Units per second of `work()` over `n` calls after one warm-up, the best of three rounds. A fixed count, not
    a time window: every rank of a collective must call it as often as the others, or they wait forever."""
    work()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            work()
        best = max(best, units * n / (time.perf_counter() - start))
    return best


def _sync(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_tflops(dtype, device, width: int = 2048, rows: int = 2048) -> float:
    """A training matmul: [rows × width] @ [width × width] forward, then both of its gradients (the transposed
    operands a backward multiplies), in `dtype`."""
    import torch

    sync = _sync(device)
    x = torch.randn(rows, width, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(width, width, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(rows, width, dtype=dtype, device=device)

    def work():
        (x @ w).backward(grad)
        x.grad = w.grad = None
        sync()

    return _best_rate(work, 3 * 2.0 * rows * width * width) / 1e12


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

    tokens, sync = 2048, _sync(device)
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
    return _best_rate(work, counted) / 1e9


def optimizer_gbps(device, n: int = 4 * 2**20) -> float:
    """The update a step ends with, as lf-dist runs it (clip the gradients' norm, fused AdamW, gradients set to
    None), in the time model's bytes per trainable value (`step_time.OPTIMIZER_BYTES`)."""
    import torch

    from lf_dist.planner import step_time as st

    params = [torch.nn.Parameter(torch.randn(n // 4, device=device)) for _ in range(4)]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    sync = _sync(device)

    def work():
        for param in params:
            param.grad = torch.randn_like(param)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    grads = _best_rate(lambda: ([torch.randn_like(q) for q in params], sync()), 1.0)  # the gradients' making
    return st.OPTIMIZER_BYTES * n / (1 / _best_rate(work, 1.0) - 1 / grads) / 1e9


def op_latency_us(device) -> float:
    """One small operator with its backward, as a step's many small ones cost."""
    import torch

    x = torch.randn(64, device=device, requires_grad=True)
    sync = _sync(device)

    def work():
        y = x
        for _ in range(20):
            y = y * 1.0001
        y.sum().backward()
        sync()

    return 1e6 / _best_rate(work, 42.0)


def _allreduce_worker(rank: int, world: int, port: int, backend: str, out) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    big, small = torch.ones(4 * 2**20, device=device), torch.ones(1, device=device)
    sync = _sync(device)
    bus = _fixed_rate(lambda: (dist.all_reduce(big), sync()), 2 * (world - 1) / world * big.numel() * 4, 10) / 1e9
    latency = 1e6 / _fixed_rate(lambda: (dist.all_reduce(small), sync()), 1.0, 200)
    if rank == 0:
        out.put((bus, latency))
    dist.barrier()
    dist.destroy_process_group()


def allreduce(backend: str) -> tuple[float, float]:
    """(bus bandwidth GB/s, latency µs) of an all-reduce between two processes on this machine."""
    import torch.multiprocessing as mp

    from lf_dist.ports import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(2, free_port(), backend, queue), nprocs=2, start_method="spawn")
    return queue.get()


def calibrate(report=print) -> HardwareProfile:
    """This machine's profile with its measured rates."""
    import torch

    hw = detect()
    device = torch.device("cuda" if hw.on_gpu else "cpu")
    wide = 8192 if hw.on_gpu else 2048
    fp32 = matmul_tflops(torch.float32, device, wide)
    narrow = matmul_tflops(torch.float32, device, 256)
    report(f"matmul fp32: {fp32:.3f} TFLOP/s ({narrow:.3f} at width 256)")
    bf16 = matmul_tflops(torch.bfloat16, device, wide) if hw.bf16 else 0.0
    report(f"matmul bf16: {bf16:.3f} TFLOP/s")
    bandwidth = elementwise_gbps(device)
    report(f"elementwise: {bandwidth:.1f} GB/s")
    update = optimizer_gbps(device)
    report(f"optimizer update: {update:.1f} GB/s")
    latency = op_latency_us(device)
    report(f"operator with autograd: {latency:.1f} µs")
    changes = {
        "memory_gbps": round(bandwidth, 2),
        "optimizer_gbps": round(update, 2),
        "op_latency_us": round(latency, 2),
    }
    changes["matmul_half_width"] = round(half_width(narrow, fp32, 256, wide), 1)
    if hw.on_gpu:  # the published peaks stay; what a large matmul reaches of them is measured
        changes["matmul_efficiency"] = round(bf16 / hw.peak_bf16_tflops, 3) if hw.peak_bf16_tflops else 1.0
        changes["peak_bf16_tflops"] = hw.peak_bf16_tflops or round(bf16, 3)
    else:  # a CPU has no published peak: the measured rates are the peaks
        changes.update(peak_bf16_tflops=round(bf16, 4), peak_fp32_tflops=round(fp32, 4), matmul_efficiency=1.0)
    if not hw.on_gpu or hw.gpus_per_node > 1:
        bus, hop = allreduce("nccl" if hw.on_gpu else "gloo")
        report(f"all-reduce ({'nccl' if hw.on_gpu else 'gloo'}, 2 processes): {bus:.2f} GB/s, {hop:.0f} µs")
        changes.update(intra_node_gbps=round(bus, 3), collective_latency_us=round(hop, 1))
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
