"""The train step before and after the seams work (issue 22), alternated in one process, one JSON line each.

    python benchmarks/bench_seams.py [--config sft_lora_packing|sft_lora|sft_full|dpo_lora] [--rounds 24]
        [--before aa1f23c]

"before" is the scoring of the commit `--before` (its `train/token_logps.py`, read from git: the output layer's
forward rebound once and steered by a context variable, the log-probs handed back as `.logits`), with the
stage's reference log-probs computed inside its loss (no `prepare`); "after" is this tree's explicit scoring
forward and `prepare`. One model, one batch, the train step of `bench_vs_llamafactory.py`'s config (the 11M
Llama, batch 4, cutoff 1,024, fp32), each side in turn for `--rounds` rounds, so both see the same machine
moments. Reported per side: median and fastest step seconds; then their ratios (after / before) and the
relative loss difference on the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_lora import trainer  # noqa: E402
from benchmarks.bench_train import cpu_name  # noqa: E402
from benchmarks.bench_vs_llamafactory import CONFIGS, write_assets, write_yaml  # noqa: E402


def old_scoring(commit: str):
    """`label_logps` as the commit had it, loaded from git into a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{commit}:lf_dist/train/token_logps.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("token_logps_before")
    exec(compile(source, f"{commit}:token_logps.py", "exec"), module.__dict__)
    return module.label_logps


@contextlib.contextmanager
def side(tr, before: bool, old_label_logps):
    """The trainer as it runs before (old scoring, reference inside the loss) or after the change."""
    if not before:
        yield tr.stage.prepare
        return
    from lf_dist.train import losses, token_logps
    from lf_dist.train.losses import one_step
    from lf_dist.train.token_logps import TokenLogps

    new = token_logps.label_logps
    token_logps.label_logps = losses.label_logps = lambda *a, **k: TokenLogps(*old_label_logps(*a, **k))
    try:
        yield one_step
    finally:
        token_logps.label_logps = losses.label_logps = new


def timed_step(tr, batch: list[dict], prepare) -> float:
    start = time.perf_counter()
    tr.model.train()
    tr.train_step(prepare(tr.context, [dict(b) for b in batch]))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sft_lora_packing", choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--before", default="aa1f23c")
    args = p.parse_args()
    import torch

    old = old_scoring(args.before)
    head = {"bench": "seams_step", "device": cpu_name(), "torch": torch.__version__, "config": args.config}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            model_dir, data = write_assets(tmp, 240)
            yaml_path = tmp / f"{args.config}.yaml"
            write_yaml(yaml_path, args.config, model_dir, data, types.SimpleNamespace(cutoff_len=1024, batch_size=4))
            tr = trainer(yaml_path)
        batch = next(tr._loader(0))
        sides = {"before": True, "after": False}
        for before in sides.values():  # warm-up
            with side(tr, before, old) as prepare:
                timed_step(tr, batch, prepare)
        losses = {}
        with torch.no_grad():
            for name, before in sides.items():
                with side(tr, before, old) as prepare:
                    steps = prepare(tr.context, [dict(b) for b in batch])
                    losses[name] = sum(float(tr.loss(tr.model, b)[0]) for s in steps for b in s)
        times: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for name in sorted(sides, reverse=r % 2 == 1):  # either side first in turn
                with side(tr, sides[name], old) as prepare:
                    times[name].append(timed_step(tr, batch, prepare))
    tokens = sum(b["input_ids"].numel() for b in batch)
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(json.dumps({**head, "side": name, "tokens_per_step": tokens, "median_step_s": round(med, 4),
                          "min_step_s": round(best, 4), "rounds": args.rounds}), flush=True)  # fmt: skip
    stats = {"median": statistics.median, "min": min}
    ratio = {k: round(f(times["after"]) / f(times["before"]), 3) for k, f in stats.items()}
    print(json.dumps({**head, "compare": "after/before", "before": args.before, "median_ratio": ratio["median"],
                      "min_ratio": ratio["min"], "loss_rel_diff": abs(losses["after"] / losses["before"] - 1)}),
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
