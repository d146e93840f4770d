"""How long `lf-dist plan` takes for the big models, and the LoRA count it rests on: counted on a one-layer copy
(what the planner does) against peft on every layer (what it did), in the same process. JSON lines.

    python benchmarks/bench_plan.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "model-configs"
YAML = ROOT / "examples" / "tiny" / "sft_lora.yaml"
CASES = {  # name: plan arguments (the 405B case of issue 21: 2 × h100x8, finetuning_type auto, cutoff 2,048)
    "Llama-3.1-405B on 2 × h100x8, auto": [
        "Llama-3.1-405B",
        "finetuning_type=auto",
        "--profile",
        "h100x8",
        "--nnodes",
        "2",
    ],
    "Llama-3.1-70B on a6000x1, auto, rank 256": [
        "Llama-3.1-70B",
        "finetuning_type=auto",
        "lora_rank=256",
        "--profile",
        "a6000x1",
    ],
    "Llama-3.1-8B on a6000x1, lora": ["Llama-3.1-8B", "finetuning_type=lora", "--profile", "a6000x1"],
}


def plan_seconds(args: list[str]) -> float:
    model, *rest = args
    cmd = [sys.executable, "-m", "lf_dist", "plan", str(YAML), f"model_name_or_path={CONFIGS / model}"]
    cmd += ["cutoff_len=2048", "bf16=true", *rest]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def lora_count_seconds(model: str) -> dict:
    import copy

    from lf_dist.model.heads import CAUSAL_LM
    from lf_dist.planner.model_size import _trainable, meta_model, read_model_config, trainable_params
    from lf_dist.run_checks import load_config

    cfg = load_config(YAML, [f"model_name_or_path={CONFIGS / model}"])
    config = read_model_config(str(CONFIGS / model))
    start = time.perf_counter()
    one_layer = trainable_params(config, CAUSAL_LM, cfg, "lora")
    mid = time.perf_counter()
    whole = copy.deepcopy(cfg)
    whole.finetuning.disable_gradient_checkpointing = True
    every_layer = _trainable(meta_model(config, CAUSAL_LM), whole, CAUSAL_LM)
    end = time.perf_counter()
    assert one_layer == every_layer, (one_layer, every_layer)
    return {"one_layer_s": round(mid - start, 3), "every_layer_s": round(end - mid, 3), "trainable": one_layer}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for name, case in CASES.items():
        times = [plan_seconds(case) for _ in range(args.repeats)]
        print(json.dumps({"bench": "plan", "case": name, "median_s": round(statistics.median(times), 2),
                          "runs_s": [round(t, 2) for t in times]}), flush=True)  # fmt: skip
    for model in ("Llama-3.1-405B", "Llama-3.1-70B"):
        print(json.dumps({"bench": "lora_count", "model": model, **lora_count_seconds(model)}), flush=True)


if __name__ == "__main__":
    main()
