"""The time model against gpu_throughput.py on one card: the plan's tokens/s beside the measured ones, JSON lines.

    python benchmarks/gpu_step_time.py --profile calibrated.yaml --measured gpu_throughput.jsonl [--variant +varlen]

For each model gpu_throughput.py measured (its `--variant` line), the same shapes are planned: a folder with the
model's config.json, and a YAML as a user would write it for that run (stage pt, packed rows of the benchmark's
length, batch 1, bf16, full or LoRA rank 16 on every linear layer), planned with `--profile` (the card as
`lf-dist env --calibrate` measured it). Printed: predicted and measured tokens/s and their ratio (issue 27's
goal on the CPU: within ±25%). `benchmarks/gpu_session.sh` runs it after gpu_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_throughput import MODELS  # noqa: E402


def write_model(folder: Path, spec: dict) -> Path:
    from transformers import LlamaConfig

    keys = {k: v for k, v in spec.items() if k not in ("lora", "seq")}
    LlamaConfig(**keys, max_position_embeddings=max(8192, spec["seq"])).save_pretrained(folder)
    return folder


def write_yaml(path: Path, model: Path, spec: dict) -> Path:
    keys = {
        "model_name_or_path": str(model),
        "stage": "pt",
        "finetuning_type": "lora" if spec["lora"] else "full",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_target": "all",
        "dataset": "c4_demo",
        "cutoff_len": spec["seq"],
        "packing": "true",
        "per_device_train_batch_size": 1,
        "bf16": "true",
        "output_dir": str(path.parent / "out"),
    }
    path.write_text("\n".join(f"{k}: {v}" for k, v in keys.items()) + "\n", encoding="utf-8")
    return path


def predicted(name: str, profile: str, tmp: Path) -> dict:
    spec = MODELS[name]
    folder = write_model(tmp / name, spec)
    config = write_yaml(tmp / f"{name}.yaml", folder, spec)
    cmd = [sys.executable, "-m", "lf_dist", "plan", str(config), "--profile", profile, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=False)
    if proc.returncode != 0:
        raise SystemExit(f"plan failed for {name}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)["step_time"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", required=True)
    p.add_argument("--measured", required=True, help="gpu_throughput.py's JSON lines")
    p.add_argument("--variant", default="lf-dist", help="the measured variant to compare (lf-dist, +varlen, ...)")
    args = p.parse_args()
    lines = [json.loads(x) for x in Path(args.measured).read_text(encoding="utf-8").splitlines() if x.strip()]
    measured = [x for x in lines if x.get("variant") == args.variant and "tokens_per_s" in x]
    with tempfile.TemporaryDirectory() as tmp:
        for row in measured:
            t = predicted(row["model"], args.profile, Path(tmp))
            ratio = t["tokens_per_s"] / row["tokens_per_s"]
            out = {"bench": "gpu_step_time", "model": row["model"], "variant": args.variant}
            out.update(predicted_tokens_per_s=round(t["tokens_per_s"], 1), measured_tokens_per_s=row["tokens_per_s"])
            out.update(ratio=round(ratio, 3), within_25pct=abs(ratio - 1) <= 0.25, predicted_mfu=round(t["mfu"], 3))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
