"""LLaMA-Factory's own example training configs, run unchanged through `lf-dist train` on the tiny model.

The 41 configs of tests/fixtures/lf_examples (LLaMA-Factory's examples/, verbatim) are run in a scratch copy of
that folder, as a user runs them from a LLaMA-Factory checkout: their own output_dir, dataset_dir and DeepSpeed
files; only model_name_or_path (the repo's tiny model; for LLaMA-Pro a tiny model expanded as its expand.sh does),
max_steps and report_to are overridden. Each config ends as `ran` (exit 0; its first and last logged loss, or its
prediction metrics), `refused` (exit 2 with one line on stderr, no traceback) or `crashed` (anything else). One
JSON line per config, then a summary line.

    python benchmarks/lf_examples.py [--only SUBSTRING] [--max-steps 3] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lf_examples"
TINY = ROOT / "examples" / "tiny" / "model"
# configs whose model is one a LLaMA-Factory script makes first: LLaMA-Pro's expanded checkpoint
EXPANDED = "models/llama3-8b-pro"
# LLaMA-Factory's multimodal configs (images / video): lf-dist trains text models
MULTIMODAL = ("vl", "mossvl")


def expanded_tiny_model(out: Path, layers: int = 8, num_expand: int = 8) -> Path:
    """A tiny Llama of `layers` layers expanded to layers + num_expand as LLaMA-Factory's scripts/llama_pro.py
    does: after every `layers // num_expand` layers, a copy whose o_proj and down_proj are zero (an identity)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY)
    config.num_hidden_layers = layers
    base = AutoModelForCausalLM.from_config(config)
    state, split, new_layer = base.state_dict(), layers // num_expand, 0
    expanded = {k: v for k, v in state.items() if ".layers." not in k}
    for i in range(layers):
        for copy in (False, True) if (i + 1) % split == 0 else (False,):
            for key, value in state.items():
                if f".layers.{i}." in key:
                    zero = copy and ("o_proj" in key or "down_proj" in key)
                    new_key = key.replace(f".layers.{i}.", f".layers.{new_layer}.")
                    expanded[new_key] = torch.zeros_like(value) if zero else value.clone()
            new_layer += 1
    config.num_hidden_layers = new_layer
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(expanded)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    return out


def _scratch() -> Path:
    work = Path(tempfile.mkdtemp(prefix="lf_examples_"))
    shutil.copytree(FIXTURE, work, dirs_exist_ok=True)
    expanded_tiny_model(work / EXPANDED)
    return work


def _summary_of_run(work: Path, config: Path) -> dict:
    """First and last logged loss (training), or the prediction metrics, from the config's own output_dir."""
    import yaml

    out = work / yaml.safe_load(config.read_text(encoding="utf-8"))["output_dir"]
    found = {}
    log = out / "trainer_log.jsonl"
    if log.is_file():
        losses = [r["loss"] for r in map(json.loads, log.read_text(encoding="utf-8").splitlines()) if "loss" in r]
        if losses:
            found.update(first_loss=losses[0], last_loss=losses[-1])
    predict = out / "predict_results.json"
    if predict.is_file():
        found["predict"] = json.loads(predict.read_text(encoding="utf-8"))
    return found


def run_one(work: Path, config: Path, max_steps: int, timeout: int) -> dict:
    model = work / EXPANDED if "llama_pro" in config.parts else TINY
    cmd = [sys.executable, "-m", "lf_dist", "train", str(config.relative_to(work))]
    cmd += [f"model_name_or_path={model}", f"max_steps={max_steps}", "report_to=none"]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NNODES", "NPROC_PER_NODE", "USE_RAY")}
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "crashed", "message": f"timed out after {timeout} s", "seconds": timeout}
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    row = {"seconds": round(time.time() - start, 1)}
    if done.returncode == 0:
        row.update(status="ran", **_summary_of_run(work, config))
    elif done.returncode == 2 and "Traceback" not in done.stderr:
        row.update(status="refused", message=lines[-1] if lines else "")
    else:
        row.update(status="crashed", rc=done.returncode, message="\n".join(lines[-5:]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the configs whose path contains this")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    work = _scratch()
    configs = sorted(p for p in (work / "examples").rglob("*.yaml") if args.only in str(p.relative_to(work)))
    counts = {"ran": 0, "refused": 0, "crashed": 0}
    for config in configs:
        name = str(config.relative_to(work / "examples"))
        row = {"config": name, "multimodal": any(m in name for m in MULTIMODAL)}
        row.update(run_one(work, config, args.max_steps, args.timeout))
        counts[row["status"]] += 1
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": counts, "configs": len(configs), "scratch": str(work)}), flush=True)


if __name__ == "__main__":
    main()
