"""Preprocessing throughput: lf-dist vs. LLaMA-Factory (PyPI) on the same synthetic alpaca data, same run.

    python benchmarks/bench_preprocess.py [--records 20000] [--workers N] [--template qwen]

Each side runs in its own process with an empty `datasets` cache and is timed around its data entry point
(lf-dist `build_datasets`, LLaMA-Factory `get_dataset`): file loading, format alignment, template rendering and
tokenization, imports excluded. tokens/s counts the input tokens produced. LLaMA-Factory runs only when its
reference venv exists (`make test` builds .venv-lf). A last line reports the padding share of batches with
and without packing (`--batch-size` rows per batch, shuffled), which packing exists to remove.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "examples" / "tiny" / "model"


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Synthetic alpaca records with a realistic spread of lengths (short tasks to long answers)."""
    words = (ROOT / "examples" / "data" / "pretrain_demo.jsonl").read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [
        {"instruction": text(5, 40), "input": text(0, 60) if rng.random() < 0.5 else "", "output": text(5, 300)}
        for _ in range(n)
    ]


def _build(args, data_dir: Path, *extra: str) -> tuple[object, float]:
    """lf-dist's train split for the synthetic data, and the seconds `build_datasets` took."""
    from transformers import AutoTokenizer

    from lf_dist.data import SUPERVISED, build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.run_checks import load_config

    keys = {
        "model_name_or_path": MODEL,
        "dataset": "synthetic",
        "dataset_dir": data_dir,
        "template": args.template,
        "cutoff_len": args.cutoff_len,
        "output_dir": "unused",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in keys.items()] + list(extra))
    tok = AutoTokenizer.from_pretrained(MODEL)
    template = get_template(cfg.data.template, tok, cfg.data)
    fix_tokenizer(template, tok)
    start = time.perf_counter()
    train = build_datasets(cfg, tok, template, SUPERVISED).train
    return train, time.perf_counter() - start


def ours(args, data_dir: Path) -> dict:
    workers = [f"preprocessing_num_workers={args.workers}"] if args.workers else []
    train, seconds = _build(args, data_dir, "overwrite_cache=true", *workers)
    return {"seconds": seconds, "tokens": sum(len(r) for r in train["input_ids"]), "rows": len(train)}


def llamafactory(args, data_dir: Path, work: Path) -> dict | None:
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import lf_venv

    ok, why = lf_venv.ready()
    if not ok:
        print(json.dumps({"bench": "preprocess", "side": "llamafactory", "skipped": why}), flush=True)
        return None
    extra = {"preprocessing_num_workers": args.workers} if args.workers else {}
    spec = {
        "model": str(MODEL),
        "dataset_dir": str(data_dir),
        "out": str(work),
        "jobs": [
            {
                "name": "bench",
                "template": args.template,
                "dataset": "synthetic",
                "cutoff_len": args.cutoff_len,
                "extra": {"overwrite_cache": True, **extra},
            }
        ],
    }
    (work / "jobs.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_cache")}
    subprocess.run(
        [str(lf_venv.python_path()), str(ROOT / "tests/reference/lf_reference.py"), str(work / "jobs.json")],
        check=True,
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result = json.loads((work / "bench.json").read_text(encoding="utf-8"))
    ids = result["rows"]["train"]["input_ids"]
    return {"seconds": result["seconds"], "tokens": sum(len(r) for r in ids), "rows": len(ids)}


def padding_report(args, data_dir: Path) -> dict:
    """Padding share of shuffled batches, unpacked vs. packed, on the same tokenized data."""
    out = {}
    for packing in (False, True):
        train, _ = _build(args, data_dir, f"packing={packing}", f"neat_packing={packing}")
        lengths = [len(r) for r in train["input_ids"]]
        random.Random(0).shuffle(lengths)
        bs = args.batch_size
        slots = sum(max(lengths[i : i + bs]) * len(lengths[i : i + bs]) for i in range(0, len(lengths), bs))
        name = "packed" if packing else "unpacked"
        out[name] = {"rows": len(lengths), "padding_ratio": round(1 - sum(lengths) / slots, 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--workers", type=int, default=0, help="preprocessing_num_workers for both sides (0: none)")
    p.add_argument("--template", default="qwen")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--side", choices=["all", "lf-dist"], default="all")
    p.add_argument("--data-dir")
    args = p.parse_args()

    if args.side == "lf-dist":  # child process: a fresh datasets cache is set by the parent
        print(json.dumps(ours(args, Path(args.data_dir))), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        (data_dir / "synthetic.json").write_text(json.dumps(make_records(args.records)), encoding="utf-8")
        (data_dir / "dataset_info.json").write_text(
            json.dumps({"synthetic": {"file_name": "synthetic.json"}}), encoding="utf-8"
        )
        env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_cache_ours")}
        child = subprocess.run(
            [sys.executable, __file__, "--side", "lf-dist", "--data-dir", str(data_dir), *sys.argv[1:]],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results = {"lf-dist": json.loads(child.stdout.strip().splitlines()[-1])}
        lf_work = work / "lf"
        lf_work.mkdir()
        lf = llamafactory(args, data_dir, lf_work)
        if lf is not None:
            results["llamafactory"] = lf
        common = {
            "bench": "preprocess",
            "records": args.records,
            "template": args.template,
            "cutoff_len": args.cutoff_len,
            "workers": args.workers or 1,
        }
        for side, r in results.items():
            print(
                json.dumps(
                    {
                        **common,
                        "side": side,
                        **r,
                        "seconds": round(r["seconds"], 3),
                        "tokens_per_second": round(r["tokens"] / r["seconds"], 1),
                    }
                ),
                flush=True,
            )
        if lf is not None:
            same = results["lf-dist"]["tokens"] == lf["tokens"] and results["lf-dist"]["rows"] == lf["rows"]
            print(
                json.dumps(
                    {
                        **common,
                        "compare": "lf-dist/llamafactory",
                        "same_tokens": same,
                        "speedup": round(lf["seconds"] / results["lf-dist"]["seconds"], 2),
                    }
                ),
                flush=True,
            )
        print(
            json.dumps(
                {**common, "bench": "padding", "batch_size": args.batch_size, **padding_report(args, data_dir)}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
