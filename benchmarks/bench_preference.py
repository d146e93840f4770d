"""DPO with packed pairs vs. padded pairs on the same data, one JSON line per side and a ratio line.

    python benchmarks/bench_preference.py [--model small|tiny] [--pairs 600] [--method lora|full]

Both sides train one epoch of LoRA (or full) DPO, sigmoid loss, on the same synthetic ranking pairs whose
answers vary from 1 to ~150 words. Unpacked: batches of 8 pairs, chosen and rejected padded to the longest of
the 16 sequences. Packed: pairs packed whole into rows of 2 x cutoff_len tokens, 2 rows per batch, fed without
an attention mask. Reported: epoch time, real tokens per second, padding share of the batch slots, peak memory
(CUDA allocator peak on GPU, process peak RSS on CPU), and the final loss (same data, so both should be close).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import cpu_name, make_model, peak_rss_gb  # noqa: E402

WORDS = "dragon basket tiger silver bridge pencil harbor yellow river umbrella garden window candle".split()


def write_pairs(root: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def answer() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(int(rng.paretovariate(1.2) * 4) % 150 + 1))

    rows = [
        {
            "conversations": [{"from": "human", "value": f"Describe the {rng.choice(WORDS)}."}],
            "chosen": {"from": "gpt", "value": answer()},
            "rejected": {"from": "gpt", "value": answer()},
        }
        for _ in range(n)
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "pairs.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {
        "bench_pairs": {
            "file_name": "pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        }
    }
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return root


def run_side(args) -> dict:
    from lf_dist.run_checks import load_config
    from lf_dist.worker import run

    packed = args.side == "packed"
    overrides = {
        "model_name_or_path": args.model_path,
        "stage": "dpo",
        "pref_loss": "sigmoid",
        "dataset": "bench_pairs",
        "dataset_dir": args.data,
        "template": "chatml",
        "cutoff_len": args.cutoff_len,
        "packing": packed,
        "finetuning_type": args.method,
        "per_device_train_batch_size": 2 if packed else 8,
        "num_train_epochs": 1,
        "learning_rate": 1e-4,
        "logging_steps": 1000,
        "save_steps": 100000,
        "disable_tqdm": True,
        "disable_gradient_checkpointing": True,
        "overwrite_output_dir": True,
        "output_dir": args.out,
        "bf16": args.bf16,
    }
    results = run(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    cuda = torch.cuda.is_available()
    return {
        "seconds": results["train_runtime"],
        "steps": results["total_steps"],
        "tokens_per_second": results["train_tokens_per_second"],
        "padding_ratio": results["padding_ratio"],
        "train_loss": round(results["train_loss"], 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else round(peak_rss_gb(), 3),
        "memory_kind": "cuda_allocator" if cuda else "process_rss",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "small"], default="small")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--pairs", type=int, default=600)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--side", choices=["unpacked", "packed"], help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:  # one side, in its own process so peak memory is its own
        print(json.dumps(run_side(args)))
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    head = {"bench": "dpo_packing", "model": args.model, "method": args.method, "pairs": args.pairs}
    head.update(cutoff_len=args.cutoff_len, bf16=args.bf16, device=device, torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data = make_model(args.model, tmp), write_pairs(tmp / "data", args.pairs)
        sides = {}
        for side in ("unpacked", "packed"):
            cmd = [sys.executable, __file__, "--side", side, "--model-path", str(model), "--data", str(data)]
            cmd += ["--out", str(tmp / side), "--method", args.method, "--cutoff-len", str(args.cutoff_len)]
            cmd += ["--bf16"] if args.bf16 else []
            proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=True)
            sides[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({**head, "side": side, **sides[side]}), flush=True)
    u, k = sides["unpacked"], sides["packed"]
    ratios = {
        "epoch_speedup": round(u["seconds"] / k["seconds"], 3),
        "tokens_per_second_ratio": round(k["tokens_per_second"] / u["tokens_per_second"], 3),
        "peak_memory_ratio": round(k["peak_memory_gb"] / u["peak_memory_gb"], 3),
    }
    print(json.dumps({**head, "compare": "packed/unpacked", **ratios}))


if __name__ == "__main__":
    main()
