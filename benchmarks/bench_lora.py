"""peft's LoRA forward vs lf-dist's lean one (kernels/lora.py) in the same train step, one JSON line each.

    python benchmarks/bench_lora.py [--config sft_lora_packing|sft_lora] [--rounds 24]

One process, one model, one batch: the train step of `bench_vs_llamafactory.py`'s config (the 11M Llama, LoRA
rank 8 on every linear layer, batch 4, cutoff 1,024, fp32) runs `--rounds` times with each forward in turn, so
both see the same machine moments. Reported per side: median and fastest step seconds; then their ratios
(lean / peft) and the relative loss difference after the warm-up (same weights, same batch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import cpu_name  # noqa: E402
from benchmarks.bench_vs_llamafactory import CONFIGS, write_assets, write_yaml  # noqa: E402


def trainer(yaml_path: Path):
    """The Trainer `lf-dist train` would build for this config, in this process."""
    from lf_dist import worker
    from lf_dist.data import build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.model import load_tokenizer
    from lf_dist.parallel import build_strategy
    from lf_dist.planner import detect, make_plan
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    cfg = load_config(yaml_path, [])
    stage = get_stage(cfg.finetuning.stage)
    cfg = make_plan(cfg, detect(), stage).resolve(cfg)
    strategy = build_strategy(cfg)
    tok = load_tokenizer(cfg)
    template = get_template(cfg.data.template, tok, cfg.data)
    fix_tokenizer(template, tok)
    datasets = build_datasets(cfg, tok, template, stage.data)
    return worker.build_trainer(cfg, stage, strategy, tok, datasets, yaml_path.parent / "ckpt")


def use(model, lean: bool) -> None:
    """Bind the lean forward to every plain LoRA layer, or take it away (peft's class forward)."""
    from peft.tuners.lora.layer import Linear

    from lf_dist.kernels import lora

    for module in model.modules():
        if type(module) is Linear:
            module.__dict__.pop("forward", None)
            if lean:
                module.forward = types.MethodType(lora.lean_forward, module)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sft_lora_packing", choices=[c for c in CONFIGS if "lora" in c])
    p.add_argument("--rounds", type=int, default=24)
    args = p.parse_args()
    import torch

    head = {"bench": "lora_forward", "device": cpu_name(), "torch": torch.__version__, "config": args.config}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            model_dir, data = write_assets(tmp, 240)
            yaml_path = tmp / f"{args.config}.yaml"
            write_yaml(yaml_path, args.config, model_dir, data, types.SimpleNamespace(cutoff_len=1024, batch_size=4))
            tr = trainer(yaml_path)
        batch = next(tr._loader(0))
        sides = {"peft": False, "lean": True}
        for _ in range(2):
            tr.train_step([batch])  # warm-up; B is no longer zero after it
        with torch.no_grad():  # the loss of each side on the same weights
            losses = {}
            for side, lean in sides.items():
                use(tr.model, lean)
                losses[side] = sum(float(tr.loss(tr.model, b)[0]) for b in batch)
        times: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sorted(sides, reverse=r % 2 == 1):  # either side first in turn
                use(tr.model, sides[side])
                start = time.perf_counter()
                tr.train_step([batch])
                times[side].append(time.perf_counter() - start)
    tokens = sum(b["input_ids"].numel() for b in batch)
    for side, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(json.dumps({**head, "side": side, "tokens_per_step": tokens, "median_step_s": round(med, 4),
                          "min_step_s": round(best, 4), "rounds": args.rounds}), flush=True)  # fmt: skip
    stats = {"median": statistics.median, "min": min}
    ratio = {k: round(f(times["lean"]) / f(times["peft"]), 3) for k, f in stats.items()}
    print(json.dumps({**head, "compare": "lean/peft", "median_ratio": ratio["median"], "min_ratio": ratio["min"],
                      "loss_rel_diff": abs(losses["lean"] / losses["peft"] - 1)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
