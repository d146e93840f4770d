"""Peak memory of the output layer + cross-entropy, naive vs. chunked, one JSON line.

    python benchmarks/ce_memory.py [--vocab 151936] [--hidden 1024] [--tokens 4096] [--frozen-weight]

Each side runs forward and backward of  sum_t log p(y_t | h_t)  through a [vocab × hidden] output layer, fp32,
in a fresh subprocess: naive = `F.linear` then `F.cross_entropy` (the [tokens × vocab] logits, their
log-softmax and gradient all exist), chunked = `lf_dist.kernels.cross_entropy.linear_logps`. The peak is what
the computation adds above its inputs (hidden states, weight): process peak RSS on CPU, the CUDA allocator's
peak on a GPU (`--device cuda`). The weight trains (full fine-tuning) unless `--frozen-weight` (LoRA). Both
sides report their loss and the gradient norm, which must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(args) -> dict:
    import torch
    import torch.nn.functional as F

    from lf_dist.kernels.cross_entropy import linear_logps

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(args.tokens, args.hidden, device=device, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) * 0.02).requires_grad_(
        not args.frozen_weight
    )
    y = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    start = time.perf_counter()
    if args.side == "naive":
        loss = F.cross_entropy(F.linear(h, w), y, reduction="sum")
    else:
        loss = -linear_logps(h, w, None, y).sum()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = _peak_rss_mib() - base
    grads = [t.grad for t in (h, w) if t.grad is not None]
    return {
        "peak_mib": round(peak, 1),
        "seconds": round(time.perf_counter() - start, 3),
        "loss": float(loss),
        "grad_norm": float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--frozen-weight", action="store_true")
    p.add_argument("--side", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    sides = {}
    for side in ("naive", "chunked"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
        out = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])
    naive, chunked = sides["naive"], sides["chunked"]
    print(
        json.dumps(
            {
                "bench": "ce_memory",
                "vocab": args.vocab,
                "hidden": args.hidden,
                "tokens": args.tokens,
                "dtype": "float32",
                "device": args.device,
                "weight_trains": not args.frozen_weight,
                "naive_peak_mib": naive["peak_mib"],
                "chunked_peak_mib": chunked["peak_mib"],
                "memory_ratio": round(naive["peak_mib"] / max(chunked["peak_mib"], 1e-9), 2),
                "naive_s": naive["seconds"],
                "chunked_s": chunked["seconds"],
                "loss_rel_diff": abs(naive["loss"] - chunked["loss"]) / abs(naive["loss"]),
                "grad_norm_rel_diff": abs(naive["grad_norm"] - chunked["grad_norm"]) / naive["grad_norm"],
            }
        )
    )


if __name__ == "__main__":
    main()
