"""Can this config continue that checkpoint? Read from the run it records (lf_dist_run.json), before anything
heavy is loaded: what changes the model's shape or the data stream is refused in one line naming the key, both
values and what to do; what a continued run may change (a learning rate, more steps, another world size with
the same global batch) goes on with one notice line.
"""

from __future__ import annotations

import json
from pathlib import Path

from lf_dist.errors import UserError
from lf_dist.train.checkpoint import RUN_FILE, STATE_FILE

# the model, its trainable parameters and the tokens it sees: a checkpoint of another cannot be continued
FIXED = (
    "stage",
    "finetuning_type",
    "model_name_or_path",
    "adapter_name_or_path",
    "lora_rank",
    "lora_alpha",
    "lora_target",
    "additional_target",
    "use_dora",
    "use_rslora",
    "freeze_trainable_layers",
    "freeze_trainable_modules",
    "freeze_extra_modules",
    "quantization_bit",
    "quantization_type",
    "double_quantization",
    "template",
    "cutoff_len",
    "dataset",
    "max_samples",
    "val_size",
    "packing",
    "neat_packing",
    "seed",
    "data_seed",
    "pref_loss",
    "ref_model",
)
# keys a continued run may change: named in the notice
CHANGEABLE = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "save_steps",
    "logging_steps",
    "eval_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)
PATHS = ("model_name_or_path", "adapter_name_or_path", "ref_model")


def _same(key: str, a, b) -> bool:
    if key in PATHS and a and b:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    return a == b


def check_resume(cfg, path: Path, dp_size: int) -> list[str]:
    """Refuse (UserError) what cannot be continued; return the changes that can, as notice lines."""
    path = Path(path)
    run_file = path / RUN_FILE
    if not run_file.is_file():
        return []  # a checkpoint of an earlier lf-dist: nothing recorded to compare
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    now = cfg.to_dict()
    for key in FIXED:
        if key in saved and not _same(key, saved[key], now.get(key)):
            raise UserError(
                f"resume_from_checkpoint: {key} is {now.get(key)!r} now but {saved[key]!r} in {path.name}; set it "
                f"back to {saved[key]!r} to continue, or start a new run (another output_dir, or "
                "overwrite_output_dir: true)"
            )
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    saved_dp = state.get("dp_size", dp_size)
    training_args = cfg.train

    def global_batch(src: dict, dp: int) -> int:
        return src["per_device_train_batch_size"] * src["gradient_accumulation_steps"] * dp

    then, here = global_batch(saved, saved_dp), global_batch(now, dp_size)
    if then != here:
        raise UserError(
            f"resume_from_checkpoint: the global batch is {here} now (per_device_train_batch_size "
            f"{training_args.per_device_train_batch_size} × gradient_accumulation_steps "
            f"{training_args.gradient_accumulation_steps} × "
            f"{dp_size} ranks) but {then} in {path.name}; keep it at {then} (the data position depends on it)"
        )
    changes = [f"{k} {saved[k]!r} → {now[k]!r}" for k in CHANGEABLE if k in saved and saved[k] != now.get(k)]
    if saved_dp != dp_size:
        changes.append(f"data-parallel ranks {saved_dp} → {dp_size}")
    return changes
