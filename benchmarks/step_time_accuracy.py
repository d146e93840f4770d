"""The time model against measurement on this machine: predicted step time vs the median of 5 measured steps.

    python benchmarks/step_time_accuracy.py [--profile FILE] [--cases ddp:lora:2,...] [--steps 10]

First `lf-dist env --calibrate` (into a temporary file, unless --profile gives one), then per case one
`lf-dist plan --json` and one `lf-dist train` with the same YAML and launch variables (FORCE_TORCHRUN=1,
NPROC_PER_NODE) as a user would type them, LF_DIST_PROFILE pointing at the calibration. The model is
bench_vs_llamafactory's 11M-parameter Llama, the stage pt (every row a full cutoff_len of tokens, every token
a label: the plan's tokens per step), fp32 as LLaMA-Factory's default. A step's time is its logging window
(`logging_steps: 1`): the step's tokens over its tokens/s; the first steps (warm-up) are left out.
Goal (issue 27): every prediction within ±25% of the measured median. JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import cpu_name  # noqa: E402
from benchmarks.bench_vs_llamafactory import WORDS, write_assets  # noqa: E402

STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp2": ["strategy=fsdp2"],
    "zero2": [f"deepspeed={ROOT / 'examples/deepspeed/ds_z2_config.json'}"],
}
CASES = [f"{s}:{m}:{n}" for n in (1, 2) for s in STRATEGIES for m in ("lora", "full")]


def write_pt_data(data: Path, n: int = 400, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 400)))} for _ in range(n)]
    (data / "pt.json").write_text(json.dumps(rows), encoding="utf-8")
    info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    info["bench_pt"] = {"file_name": "pt.json", "columns": {"prompt": "text"}}
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def write_yaml(path: Path, model: Path, data: Path, method: str, steps: int, batch: int, cutoff: int) -> None:
    keys = {
        "model_name_or_path": str(model),
        "stage": "pt",
        "do_train": "true",
        "finetuning_type": method,
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": "bench_pt",
        "dataset_dir": str(data),
        "cutoff_len": cutoff,
        "output_dir": str(path.parent / f"out_{path.stem}"),
        "overwrite_output_dir": "true",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "learning_rate": 1.0e-4,
        "disable_tqdm": "true",
    }
    path.write_text("\n".join(f"{k}: {v}" for k, v in keys.items()) + "\n", encoding="utf-8")


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "lf-dist"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def measured_steps(out: Path, skip: int) -> list[float]:
    """Seconds of each logged step after the first `skip`: its tokens over its tokens/s."""
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [e for e in map(json.loads, lines) if "tokens_per_second" in e]
    times, before = [], 0
    for e in entries:
        tokens, before = e["num_tokens"] - before, e["num_tokens"]
        times.append(tokens / e["tokens_per_second"])
    return times[skip:]


def run_case(case: str, tmp: Path, model: Path, data: Path, profile: Path, args) -> dict:
    strategy, method, nproc = case.split(":")
    yaml_path = tmp / f"{strategy}_{method}_{nproc}.yaml"
    write_yaml(yaml_path, model, data, method, args.steps, args.batch_size, args.cutoff_len)
    env = {
        **os.environ,
        "LF_DIST_PROFILE": str(profile),
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": nproc,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    plan = json.loads(_run(["plan", str(yaml_path), *STRATEGIES[strategy], "--json"], env).stdout)
    _run(["train", str(yaml_path), *STRATEGIES[strategy]], env)
    steps = measured_steps(tmp / f"out_{yaml_path.stem}", args.steps - 5)
    predicted, median = plan["step_time"]["step_s"], statistics.median(steps)
    return {
        "case": case,
        "predicted_s": round(predicted, 4),
        "measured_median_s": round(median, 4),
        "measured_s": [round(s, 4) for s in steps],
        "error": round(predicted / median - 1, 3),
        "terms": {k: plan["step_time"][k] for k in ("compute_s", "memory_s", "overhead_s", "communication_s")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="a calibrated profile (default: calibrate now)")
    p.add_argument("--cases", default=",".join(CASES), help="strategy:method:processes, comma-separated")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    args = p.parse_args()
    import torch

    head = {"bench": "step_time_accuracy", "device": cpu_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            model, data = write_assets(tmp, 8)
            write_pt_data(data)
        profile = Path(args.profile) if args.profile else tmp / "calibrated.yaml"
        if not args.profile:
            _run(["env", "--calibrate", "--output", str(profile)], dict(os.environ))
        print(json.dumps({**head, "profile": json.loads(json.dumps(_profile(profile)))}), flush=True)
        errors = []
        for case in args.cases.split(","):
            row = run_case(case, tmp, model, data, profile, args)
            errors.append(abs(row["error"]))
            print(json.dumps({**head, **row}), flush=True)
        print(json.dumps({**head, "max_abs_error": max(errors), "within_25pct": max(errors) <= 0.25}), flush=True)


def _profile(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
