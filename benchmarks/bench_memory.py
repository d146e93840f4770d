"""Memory per rank as the ranks grow: weight bytes (the local storage of every parameter) and peak memory for
1, 2 and 4 ranks, per method, JSON lines.

    python benchmarks/bench_memory.py [--ranks 1,2,4] [--methods fsdp2_lora,fsdp2_qlora,zero3_full] [--steps 2]

Each case is a real `lf-dist train` (torchrun underneath) of a ~100M-parameter random Llama saved in bf16 (as
released checkpoints are), bf16 compute, a per-device batch of 1 and 2 steps: what is compared is what each rank
holds, so the 1-rank run is the same backend on one process. Peak memory is CUDA's allocated peak on a GPU and the
process's peak RSS on a CPU (which includes rank 0's load of the full checkpoint, see RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "fsdp2_lora": ["strategy=fsdp2", "finetuning_type=lora"],
    "fsdp2_qlora": ["strategy=fsdp2", "finetuning_type=lora", "quantization_bit=4"],
    "zero3_full": [f"deepspeed={ROOT / 'examples/deepspeed/ds_z3_config.json'}", "finetuning_type=full"],
}


def make_model(path: Path) -> Path:
    """hidden 768, 14 layers, intermediate 2560 (~100M parameters; NF4 blocks split over 1, 2 and 4 ranks)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_llama

    return make_llama(path, hidden=768, layers=14, intermediate=2560, dtype=torch.bfloat16)


def run_case(model: Path, work: Path, method: str, nproc: int, steps: int) -> dict:
    out = work / f"{method}_{nproc}"
    overrides = [
        f"model_name_or_path={model}",
        "dataset=alpaca_demo",
        f"dataset_dir={ROOT / 'examples/data'}",
        "template=chatml",
        "cutoff_len=256",
        f"output_dir={out}",
        "per_device_train_batch_size=1",
        f"max_steps={steps}",
        "logging_steps=1",
        "save_steps=100000",
        "disable_tqdm=true",
        "bf16=true",
        "learning_rate=1e-4",
        "disable_gradient_checkpointing=true",
        "report_to=none",
        *METHODS[method],
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(nproc)}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    cfg_file = work / "empty.yaml"
    cfg_file.write_text("{}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(cfg_file), *overrides],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    if proc.returncode != 0:
        return {"method": method, "ranks": nproc, "error": proc.stderr.strip().splitlines()[-1:]}
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    return {
        "method": method,
        "ranks": nproc,
        "weight_mb_per_rank": [round(b / 2**20, 1) for b in results["weight_bytes_per_rank"]],
        "peak_memory_gb_per_rank": results["peak_memory_gb_per_rank"],
        "train_loss": round(results["train_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work / "model")
        for method in args.methods.split(","):
            base = None
            for nproc in (int(n) for n in args.ranks.split(",")):
                row = run_case(model, work, method, nproc, args.steps)
                if "error" not in row:
                    base = base or row
                    row["weight_share_of_1_rank"] = round(
                        row["weight_mb_per_rank"][0] / base["weight_mb_per_rank"][0], 4
                    )
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
