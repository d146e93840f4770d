"""Cost of each strategy with 1 and 2 processes: step time, tokens/s and peak memory per rank, JSON lines.

    python benchmarks/bench_distributed.py [--model tiny|small] [--steps 20] [--strategies ddp,fsdp2,zero2,zero3]

Each case is a real `lf-dist train` (torchrun underneath, FORCE_TORCHRUN=1) on the same global batch. On the
CPU build machine these are correctness-of-cost figures (communication and sharding overheads on 2 cores),
not speed claims; with a GPU the same script records single-GPU figures (1 process per strategy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
STRATEGIES = {
    "single": ["strategy=single"],
    "ddp": ["strategy=ddp"],
    "fsdp2": ["strategy=fsdp2"],
    "zero2": [f"deepspeed={ROOT / 'examples/deepspeed/ds_z2_config.json'}"],
    "zero3": [f"deepspeed={ROOT / 'examples/deepspeed/ds_z3_config.json'}"],
}


def run_case(model: Path, work: Path, strategy: str, nproc: int, args) -> dict:
    out = work / f"{strategy}_{nproc}"
    global_batch = args.global_batch
    overrides = [
        f"model_name_or_path={model}",
        "dataset=alpaca_demo,sharegpt_demo",
        f"dataset_dir={ROOT / 'examples/data'}",
        "template=chatml",
        f"cutoff_len={args.cutoff_len}",
        f"output_dir={out}",
        f"finetuning_type={args.method}",
        f"per_device_train_batch_size={global_batch // nproc}",
        f"max_steps={args.steps}",
        "logging_steps=1",
        "save_steps=100000",
        "disable_tqdm=true",
        "learning_rate=1e-4",
        "overwrite_output_dir=true",
        "disable_gradient_checkpointing=true",
        "packing=true",
        "neat_packing=true",
        *STRATEGIES[strategy],
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if strategy != "single":
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS=str(max(1, os.cpu_count() // nproc)))
    cfg_file = work / "empty.yaml"
    cfg_file.write_text("{}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(cfg_file), *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"strategy": strategy, "nproc": nproc, "error": proc.stderr.strip().splitlines()[-1:]}
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    peaks = log[-1].get("peak_memory_gb_per_rank") or [results.get("peak_memory_gb")]
    return {
        "strategy": strategy,
        "nproc": nproc,
        "global_batch": global_batch,
        "step_time_s": round(results["train_runtime"] / results["total_steps"], 4),
        "tokens_per_second": results["train_tokens_per_second"],
        "final_loss": log[-1]["loss"],
        "peak_memory_gb_per_rank": peaks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "small"], default="small")
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--strategies", default="ddp,fsdp2,zero2,zero3")
    args = p.parse_args()
    from bench_train import cpu_name, make_model

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else cpu_name()
    counts = [1] if gpu and torch.cuda.device_count() == 1 else [1, 2]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(args.model, work)
        for strategy in ["single", *args.strategies.split(",")]:
            for nproc in [1] if strategy == "single" else counts:
                line = run_case(model, work, strategy, nproc, args)
                print(
                    json.dumps(
                        {"bench": "distributed", "model": args.model, "method": args.method, "device": device, **line}
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
