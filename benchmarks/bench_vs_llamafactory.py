"""The same YAML through LLaMA-Factory (from PyPI, its own venv) and through lf-dist, alternating; JSON lines.

    python benchmarks/bench_vs_llamafactory.py [--configs sft_lora,sft_lora_packing,dpo_lora,sft_full]
                                               [--repeats 3] [--examples 240] [--nproc 1|2]

Each config is one YAML file, written once and given unchanged to `llamafactory-cli train` (in the reference
venv that `make test` builds, `.venv-lf`) and to `lf-dist train`; the sides alternate, `--repeats` times.
The model is an 11M-parameter Llama (hidden 256, 4 layers, vocab 16,384, random weights) with the demo
tokenizer, the data synthetic alpaca records and ranking pairs with long-tailed lengths (generated here).
Every run trains one epoch, so both sides see every example once: real tokens/s is the data's non-padding
token count (counted once with lf-dist's tokenizer, the same tokens LLaMA-Factory makes: see
tests/test_parity_llamafactory.py) over the side's own train-loop time (`train_runtime`).

Per run: whole-command wall time, train-loop time, real tokens/s, peak RSS of the largest process (one rank).
Per config: medians, and lf-dist / LLaMA-Factory ratios (goal: wall ratio <= 0.5).

Sides. One rank: LLaMA-Factory on its defaults, LLaMA-Factory with `disable_gradient_checkpointing=true` (its
fastest setting at this size), lf-dist. `--nproc 2`: both launched as a user would at two ranks
(FORCE_TORCHRUN=1 NPROC_PER_NODE=2): LLaMA-Factory's DDP and its DeepSpeed ZeRO-2 (LLaMA-Factory's own
examples/deepspeed/ds_z2_config.json, as `deepspeed=` on its command line; DeepSpeed is installed into the
reference venv at the version lf-dist pins, if missing), lf-dist with `strategy=ddp` and `strategy=fsdp2`. The ratios
are against LLaMA-Factory's DDP (and, at one rank, its defaults); the others are printed beside them.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import cpu_name  # noqa: E402

WORDS = (
    "apple river stone cloud garden silver lantern meadow candle forest harbor pepper winter orange rocket "
    "violin marble thunder pillow castle dragon mirror basket feather island jacket kettle ladder needle ocean"
).split()
CONFIGS = {
    "sft_lora": {"stage": "sft", "finetuning_type": "lora", "dataset": "bench_sft"},
    "sft_lora_packing": {"stage": "sft", "finetuning_type": "lora", "dataset": "bench_sft", "packing": True},
    "dpo_lora": {"stage": "dpo", "finetuning_type": "lora", "dataset": "bench_pairs", "pref_loss": "sigmoid"},
    "sft_full": {"stage": "sft", "finetuning_type": "full", "dataset": "bench_sft"},
}
# Peak RSS of the child (the largest of its processes): the command runs under this wrapper.
RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _length(rng: random.Random, scale: float, cap: int) -> int:
    return min(int(rng.paretovariate(1.3) * scale), cap)


def write_assets(root: Path, n_examples: int, seed: int = 0) -> tuple[Path, Path]:
    """The model folder and the data folder (dataset_info.json with bench_sft and bench_pairs)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny" / "model")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=16384,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rng = random.Random(seed)
    data = root / "data"
    data.mkdir(parents=True)
    sft = [
        {"instruction": _text(rng, _length(rng, 40, 500)), "input": "", "output": _text(rng, _length(rng, 60, 700))}
        for _ in range(n_examples)
    ]
    pairs = [
        {
            "conversations": [{"from": "human", "value": _text(rng, _length(rng, 30, 300))}],
            "chosen": {"from": "gpt", "value": _text(rng, _length(rng, 40, 400))},
            "rejected": {"from": "gpt", "value": _text(rng, _length(rng, 40, 400))},
        }
        for _ in range(n_examples // 2)
    ]
    (data / "sft.json").write_text(json.dumps(sft), encoding="utf-8")
    (data / "pairs.json").write_text(json.dumps(pairs), encoding="utf-8")
    info = {
        "bench_sft": {"file_name": "sft.json"},
        "bench_pairs": {
            "file_name": "pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    }
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return model_dir, data


def write_yaml(path: Path, name: str, model: Path, data: Path, args) -> None:
    keys = {
        "model_name_or_path": str(model),
        "do_train": True,
        "lora_rank": 8,
        "lora_target": "all",
        "dataset_dir": str(data),
        "template": "chatml",
        "cutoff_len": args.cutoff_len,
        "overwrite_cache": True,
        "output_dir": str(path.parent / f"out_{name}"),
        "overwrite_output_dir": True,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "bf16": False,
        **CONFIGS[name],
    }
    lines = [f"{k}: {json.dumps(v) if isinstance(v, (bool, str)) else v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def real_tokens(yaml_path: Path) -> int:
    """Non-padding tokens of one epoch of the config's train set, as lf-dist tokenizes it."""
    from transformers import AutoTokenizer

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    cfg = load_config(yaml_path, [])
    tok = AutoTokenizer.from_pretrained(cfg.model.model_name_or_path)
    template = get_template(cfg.data.template, tok, cfg.data)
    fix_tokenizer(template, tok)
    ds = build_datasets(cfg, tok, template, get_stage(cfg.finetuning.stage).data).train
    cols = [c for c in ("input_ids", "chosen_input_ids", "rejected_input_ids") if c in ds.column_names]
    return sum(len(x) for c in cols for x in ds[c])


LF_PYTHON = Path(os.environ.get("LF_REFERENCE_PYTHON", ROOT / ".venv-lf" / "bin" / "python"))
ZERO2 = f"deepspeed={ROOT / 'examples' / 'deepspeed' / 'ds_z2_config.json'}"
# (side, tool, command-line overrides); the first side of each tool is the one the ratios use
SIDES = {
    1: [
        ("llamafactory", "llamafactory", []),
        ("llamafactory no-gc", "llamafactory", ["disable_gradient_checkpointing=true"]),
        ("lf-dist", "lf-dist", []),
    ],
    2: [
        ("llamafactory ddp", "llamafactory", []),
        ("llamafactory zero2", "llamafactory", [ZERO2]),
        ("lf-dist ddp", "lf-dist", ["strategy=ddp"]),
        ("lf-dist fsdp2", "lf-dist", ["strategy=fsdp2"]),
    ],
}


def deepspeed_in_reference() -> None:
    """LLaMA-Factory's ZeRO-2 side needs DeepSpeed in its venv: the version lf-dist's lock pins."""
    if subprocess.run([str(LF_PYTHON), "-c", "import deepspeed"], capture_output=True, check=False).returncode == 0:
        return
    pin = next(
        ln.strip()
        for ln in (ROOT / "locks" / "dev.txt").read_text(encoding="utf-8").splitlines()
        if ln.startswith("deepspeed==")
    )
    subprocess.run([str(LF_PYTHON), "-m", "pip", "install", "-q", pin], check=True)


def run_side(tool: str, yaml_path: Path, overrides: list[str], nproc: int = 1) -> dict:
    if tool == "llamafactory":
        cmd = [str(LF_PYTHON.parent / "llamafactory-cli"), "train", str(yaml_path), *overrides]
    else:
        cmd = [str(Path(sys.executable).parent / "lf-dist"), "train", str(yaml_path), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "true"}
    if nproc > 1:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(nproc))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, encoding="utf-8", env=env
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tool} {' '.join(overrides)} failed on {yaml_path.name}:\n{proc.stderr[-3000:]}")
    rss_kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    out = yaml_path.parent / f"out_{yaml_path.stem}"
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    return {
        "wall_s": round(wall, 3),
        "train_loop_s": results["train_runtime"],
        "peak_rss_gb": round(rss_kb / 2**20, 3),
        "train_loss": round(results["train_loss"], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--nproc", type=int, choices=sorted(SIDES), default=1, help="ranks on this machine")
    args = p.parse_args()
    import torch

    head = {"bench": "vs_llamafactory", "device": cpu_name(), "torch": torch.__version__, "examples": args.examples}
    head["nproc"] = args.nproc
    sides = SIDES[args.nproc]
    if any(ZERO2 in extra for _, _, extra in sides):
        deepspeed_in_reference()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # libraries' import-time log lines: stdout is JSON lines only
            model, data = write_assets(tmp, args.examples)
        for name in args.configs.split(","):
            yaml_path = tmp / f"{name}.yaml"
            write_yaml(yaml_path, name, model, data, args)
            with contextlib.redirect_stdout(sys.stderr):
                tokens = real_tokens(yaml_path)
            runs: dict[str, list[dict]] = {side: [] for side, _, _ in sides}
            for _ in range(args.repeats):
                for side, tool, extra in sides:
                    r = run_side(tool, yaml_path, extra, args.nproc)
                    r["real_tokens_per_s"] = round(tokens / r["train_loop_s"], 1)
                    runs[side].append(r)
                    print(json.dumps({**head, "config": name, "side": side, **r}), flush=True)
            print(json.dumps(_summary(head, name, tokens, runs, sides)), flush=True)


def _summary(head: dict, name: str, tokens: int, runs: dict, sides: list) -> dict:
    """Medians per side, and each lf-dist side over LLaMA-Factory's first side (its defaults, or its DDP)."""
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    lf = med[next(side for side, tool, _ in sides if tool == "llamafactory")]
    summary = {**head, "config": name, "compare": "lf-dist/llamafactory (medians)", "real_tokens": tokens, **med}
    for side, tool, _ in sides:
        if tool != "lf-dist":
            continue
        ours, tag = med[side], "" if side == "lf-dist" else f"{side.split()[-1]}_"
        summary[f"{tag}wall_ratio"] = round(ours["wall_s"] / lf["wall_s"], 3)
        summary[f"{tag}train_loop_ratio"] = round(ours["train_loop_s"] / lf["train_loop_s"], 3)
        summary[f"{tag}tokens_per_s_ratio"] = round(ours["real_tokens_per_s"] / lf["real_tokens_per_s"], 3)
        summary[f"{tag}peak_rss_ratio"] = round(ours["peak_rss_gb"] / lf["peak_rss_gb"], 3)
        for other, other_tool, _ in sides[1:]:  # LLaMA-Factory's other settings: its best one for the case
            if other_tool == "llamafactory":
                key = f"{tag}wall_ratio_vs_{other.split(maxsplit=1)[1].replace(' ', '_')}"
                summary[key] = round(ours["wall_s"] / med[other]["wall_s"], 3)
    return summary


if __name__ == "__main__":
    main()
