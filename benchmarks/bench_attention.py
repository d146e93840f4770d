"""Attention forward + backward for the examples of one micro-batch, by layout and kernel, one JSON line each.

    python benchmarks/bench_attention.py [--lengths 900,120,60,30] [--heads 4] [--kv-heads 2] [--head-dim 64]

The same examples (default: a long-tailed micro-batch of 4) four ways, fp32 on CPU (bf16 on CUDA):
  padded + 4-D mask      rows padded to the longest, sdpa with the padding mask (what a 2-D mask becomes);
  padded, is_causal      the same rows without the mask (lf-dist's right-padded rows);
  padding-free + mask    one row end to end, sdpa with a block-diagonal causal mask (transformers' way);
  padding-free, varlen   one row, `lf_dist.kernels.attention.varlen_attention` (per example on CPU,
                         torch's varlen kernel on CUDA).
The last line gives each time relative to the varlen one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lf_dist.kernels.attention import varlen_attention  # noqa: E402


def timed(fn, device, repeats: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="900,120,60,30")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    lens = [int(x) for x in args.lengths.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    h, kv, d, total, longest = args.heads, args.kv_heads, args.head_dim, sum(lens), max(lens)

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    q, k, v = leaf(1, h, total, d), leaf(1, kv, total, d), leaf(1, kv, total, d)
    qp, kp, vp = leaf(len(lens), h, longest, d), leaf(len(lens), kv, longest, d), leaf(len(lens), kv, longest, d)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    block = ((seg[:, None] == seg[None, :]) & causal)[None, None]
    real = torch.arange(longest, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    padded_mask = real[:, None, None, :] & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    module = torch.nn.Module()

    def run(out):
        out.float().sum().backward()

    sdpa = F.scaled_dot_product_attention
    cases = {
        "padded + 4-D mask": lambda: run(sdpa(qp, kp, vp, attn_mask=padded_mask, enable_gqa=True)),
        "padded, is_causal": lambda: run(sdpa(qp, kp, vp, is_causal=True, enable_gqa=True)),
        "padding-free + mask": lambda: run(sdpa(q, k, v, attn_mask=block, enable_gqa=True)),
        "padding-free, varlen": lambda: run(varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu)[0]),
    }
    head = {"bench": "attention", "lengths": lens, "heads": h, "kv_heads": kv, "head_dim": d, "device": str(device)}
    times = {}
    for name, fn in cases.items():
        times[name] = round(timed(fn, device), 2)
        print(json.dumps({**head, "case": name, "ms": times[name]}), flush=True)
    base = times["padding-free, varlen"]
    print(json.dumps({**head, "compare": "time / varlen time", **{k: round(t / base, 2) for k, t in times.items()}}))


if __name__ == "__main__":
    main()
