"""Training throughput of lf-dist vs. a bare torch+peft loop on the same batches, one JSON line each.

    python benchmarks/bench_train.py [--model tiny|small] [--steps 30] [--method lora|full]

Both sides train the same model on the same tokenized demo data, in the same order, for the same number of
optimizer steps; only the loop differs. Reported: tokens/s (non-padding input tokens per second of training,
setup excluded), the padding share of the batches, and peak memory (CUDA allocator peak on GPU, process peak
RSS on CPU). The last line gives lf-dist / baseline ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def make_model(kind: str, workdir: Path) -> Path:
    """tiny: the shipped model. small: an 11M-parameter Llama with the same tokenizer (random weights)."""
    tiny = ROOT / "examples" / "tiny" / "model"
    if kind == "tiny":
        return tiny
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = workdir / "small"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def config(model: Path, out: Path, args) -> list[str]:
    return [
        f"model_name_or_path={model}",
        "dataset=alpaca_demo,sharegpt_demo",
        f"dataset_dir={ROOT / 'examples/data'}",
        "template=chatml",
        f"cutoff_len={args.cutoff_len}",
        f"output_dir={out}",
        f"finetuning_type={args.method}",
        f"per_device_train_batch_size={args.batch_size}",
        f"max_steps={args.steps}",
        "logging_steps=1000",
        "save_steps=100000",
        "disable_tqdm=true",
        "learning_rate=1e-4",
        f"bf16={str(args.bf16).lower()}",
        "disable_gradient_checkpointing=true",
        "overwrite_output_dir=true",
    ]


def run_lf_dist(cfg) -> dict:
    from lf_dist.worker import run

    results = run(cfg)
    return {
        "tokens_per_second": results["train_tokens_per_second"],
        "padding_ratio": results["padding_ratio"],
        "steps": results["total_steps"],
        "runtime_s": results["train_runtime"],
    }


def run_baseline(cfg) -> dict:
    """The same batches through a minimal loop: HF loss (mean per micro-batch), AdamW, no logging."""
    from transformers import AutoTokenizer, set_seed

    from lf_dist.data import SUPERVISED, Collator, build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.model import apply_finetuning, load_model
    from lf_dist.train.schedule import StepSchedule

    set_seed(cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.model_name_or_path)
    template = get_template(cfg.data.template, tok, cfg.data)
    fix_tokenizer(template, tok)
    ds = build_datasets(cfg, tok, template, SUPERVISED).train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = apply_finetuning(load_model(cfg, tok), cfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate)
    sched = StepSchedule(len(ds), cfg.train.per_device_train_batch_size, 1, cfg.train.seed)
    collate = Collator(tok.pad_token_id)
    batches = [collate([ds[i] for i in sched.step(s)[0]]) for s in range(cfg.train.max_steps)]
    dtype = torch.bfloat16 if cfg.train.bf16 else None
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    runtime = time.perf_counter() - start
    return {"tokens_per_second": round(tokens / runtime, 2), "steps": len(batches), "runtime_s": round(runtime, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "small"], default="small")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--side", choices=["both", "lf-dist", "baseline"], default="both")
    args = p.parse_args()

    if args.side == "both":  # each side in its own process, so peak memory is its own
        lines = [
            json.loads(
                subprocess.check_output([sys.executable, __file__, *sys.argv[1:], "--side", side], text=True)
                .strip()
                .splitlines()[-1]
            )
            for side in ("baseline", "lf-dist")
        ]
        base, ours = lines
        for line in lines:
            print(json.dumps(line))
        print(
            json.dumps(
                {
                    "bench": "train",
                    "compare": "lf-dist/baseline",
                    "tokens_per_second_ratio": round(ours["tokens_per_second"] / base["tokens_per_second"], 3),
                    "peak_memory_ratio": round(ours["peak_memory_gb"] / base["peak_memory_gb"], 3),
                }
            )
        )
        return

    from lf_dist.run_checks import load_config

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.model, Path(tmp))
        cfg = load_config(None, config(model, Path(tmp) / "out", args))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = run_lf_dist(cfg) if args.side == "lf-dist" else run_baseline(cfg)
    on_gpu = torch.cuda.is_available()
    line = {
        "bench": "train",
        "side": args.side,
        "model": args.model,
        "method": args.method,
        "bf16": args.bf16,
        "batch_size": args.batch_size,
        "cutoff_len": args.cutoff_len,
        **result,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30 if on_gpu else peak_rss_gb(), 3),
        "memory_kind": "cuda_allocated" if on_gpu else "process_rss",
        "device": torch.cuda.get_device_name() if on_gpu else cpu_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
