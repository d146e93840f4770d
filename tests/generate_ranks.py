"""Run under torchrun by tests/test_seams.py: `Strategy.generate` on the weights being trained, where rank 0's
completions stop after 2 new tokens and rank 1's after 30, then one more training step on every rank.

argv: config.yaml out_dir key=value...; writes out_dir/rank<r>.json (completion ids, seconds, the step's loss).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

NEW_TOKENS = {0: 2, 1: 30}
PROMPTS = ["Hello, how are you?", "Name three colors"]


def main() -> None:

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.model import load_tokenizer
    from lf_dist.parallel import build_strategy
    from lf_dist.planner import detect, make_plan
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage
    from lf_dist.worker import build_trainer

    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cfg = load_config(config, overrides)
    stage = get_stage(cfg.finetuning.stage)
    cfg = make_plan(cfg, detect(), stage).resolve(cfg)
    strategy = build_strategy(cfg)
    tokenizer = load_tokenizer(cfg)
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    datasets = build_datasets(cfg, tokenizer, template, stage.data, world_size=strategy.world_size)
    trainer = build_trainer(cfg, stage, strategy, tokenizer, datasets, out / "ckpt")
    model = trainer.model
    tokenizer.padding_side = "left"
    prompts = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
    n_new = NEW_TOKENS[strategy.rank]
    start = time.perf_counter()
    ids = strategy.generate(
        model,
        prompts,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    seconds = time.perf_counter() - start
    step_loss = trainer.train_step(next(trainer._steps(0)))[0]  # the group and the shards are as before
    record = {"ids": ids.tolist(), "prompt_len": prompts["input_ids"].shape[1], "seconds": seconds, "loss": step_loss}
    (out / f"rank{strategy.rank}.json").write_text(json.dumps(record), encoding="utf-8")
    strategy.teardown()


if __name__ == "__main__":
    main()
