"""The planner's memory estimate against measured peaks, one JSON line per run and a summary line.

    python benchmarks/plan_accuracy.py [--model small|qwen0.5b|llama1b] [--steps 3]

Each case (full / LoRA / 4-bit QLoRA × two sequence lengths × checkpointing off / on) is a real `lf-dist train`
in its own process on packed pretraining rows (every row exactly cutoff_len tokens). On a GPU the measure is
`torch.cuda.max_memory_allocated` (the plan's peak without the runtime overhead) and the default model is a
random-weight Qwen2.5-0.5B (its config from examples/model-configs), bf16; on a CPU it is the process's peak RSS
and a 39M-parameter Llama, fp32. Per term: the weights (memory in use right after setup) and the rest of the
peak (activations, logits, gradients, optimizer, slack) are compared separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"qwen0.5b": "Qwen2.5-0.5B", "llama1b": "Llama-3.2-1B"}


def make_model(kind: str, path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny" / "model")
    torch.manual_seed(0)
    if kind == "small":
        config = LlamaConfig(
            vocab_size=16384,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
    else:
        config = AutoConfig.from_pretrained(ROOT / "examples" / "model-configs" / MODELS[kind])
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_case(model: Path, out: Path, method: str, checkpointing: bool, cutoff: int, steps: int, bf16: bool) -> dict:
    finetuning = ["finetuning_type=lora", "quantization_bit=4"] if method == "qlora" else [f"finetuning_type={method}"]
    cmd = [
        sys.executable,
        "-m",
        "lf_dist",
        "train",
        str(ROOT / "examples" / "tiny" / "pt_full.yaml"),
        f"model_name_or_path={model}",
        *finetuning,
        f"disable_gradient_checkpointing={str(not checkpointing).lower()}",
        f"cutoff_len={cutoff}",
        "per_device_train_batch_size=4",
        f"max_steps={steps}",
        "logging_steps=1",
        "save_steps=100000",
        "disable_tqdm=true",
        f"bf16={str(bf16).lower()}",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    plan = json.loads((out / "run_plan.json").read_text(encoding="utf-8"))
    terms = plan["memory_gib"]
    planned_static = terms["weights"] + terms.get("reference_model", 0.0)
    if plan["device"] == "cpu":
        planned_static += terms["runtime"]
    measured, planned = results["peak_memory_gb"], results["planned_peak_memory_gb"]
    return {
        "planned_peak_gb": planned,
        "measured_peak_gb": measured,
        "error": round(planned / measured - 1, 4),
        "planned_weights_gb": round(planned_static, 3),
        "measured_after_setup_gb": results["memory_after_setup_gb"],
        "planned_rest_gb": round(planned - planned_static, 3),
        "measured_rest_gb": round(measured - results["memory_after_setup_gb"], 3),
        "terms": terms,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["small", *MODELS], default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cutoffs", default=None, help="comma-separated, default 256,512 (CPU) / 512,1024 (GPU)")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    kind = args.model or ("qwen0.5b" if gpu else "small")
    cutoffs = [int(c) for c in (args.cutoffs or ("512,1024" if gpu else "256,512")).split(",")]
    device = torch.cuda.get_device_name() if gpu else "cpu"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(kind, Path(tmp) / "model")
        for method in ("full", "lora", "qlora"):
            for checkpointing in (False, True):
                for cutoff in cutoffs:
                    out = Path(tmp) / f"{method}-{checkpointing}-{cutoff}"
                    result = run_case(model, out, method, checkpointing, cutoff, args.steps, bf16=gpu)
                    line = {"bench": "plan_accuracy", "model": kind, "device": device, "method": method}
                    line |= {"checkpointing": checkpointing, "cutoff_len": cutoff, **result}
                    if isinstance(result.get("error"), float):
                        errors.append(abs(result["error"]))
                    print(json.dumps(line), flush=True)
    summary = {"bench": "plan_accuracy", "model": kind, "device": device, "runs": len(errors)}
    if errors:
        summary |= {"max_abs_error": round(max(errors), 4), "mean_abs_error": round(sum(errors) / len(errors), 4)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
