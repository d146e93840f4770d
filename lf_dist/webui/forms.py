"""The web UI's forms as LLaMA-Factory configs: form fields ↔ the YAML the CLI runs, checked as the CLI checks it.

A form is a flat dict of the keys users change most (FIELDS) plus `extra`: every other key of a YAML loaded from
disk, written back unchanged. `ranks` is not a config key: it is the launch contract (NPROC_PER_NODE), which the
run's command line carries.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lf_dist.config.loader import build_config, read_file
from lf_dist.data.registry import get_dataset_attrs
from lf_dist.errors import UserError
from lf_dist.run_checks import check_config
from lf_dist.train.stages import STAGES

# (section, keys) in the order the YAML is written, as the examples lay it out
SECTIONS = (
    ("model", ("model_name_or_path", "adapter_name_or_path", "trust_remote_code")),
    ("method", ("stage", "do_train", "finetuning_type", "lora_rank", "lora_alpha", "lora_target", "quantization_bit")),
    ("dataset", ("dataset", "dataset_dir", "template", "cutoff_len", "packing", "max_samples", "val_size")),
    ("output", ("output_dir", "logging_steps", "save_steps", "overwrite_output_dir", "report_to")),
    (
        "train",
        (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "num_train_epochs",
            "max_steps",
            "lr_scheduler_type",
            "warmup_ratio",
            "bf16",
        ),
    ),
    ("parallel", ("strategy", "deepspeed", "launcher", "ray_num_workers")),
    ("generation", ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")),
    ("export", ("export_dir", "export_size")),
)
FIELDS = tuple(key for _, keys in SECTIONS for key in keys)
# the Train page's fields: a YAML loaded there keeps its other keys (generation, export, ...) in `extra`
TRAIN_FIELDS = tuple(key for name, keys in SECTIONS if name not in ("generation", "export") for key in keys)
# the page's choices for the keys that have a fixed set of values
CHOICES = {
    "stage": tuple(STAGES),
    "finetuning_type": ("lora", "full", "freeze", "oft", "auto"),
    "lr_scheduler_type": ("cosine", "linear", "constant", "constant_with_warmup"),
    "strategy": ("auto", "single", "ddp", "fsdp2", "deepspeed", "megatron"),
    "launcher": ("auto", "torchrun", "ray"),
}


def field_kinds() -> dict[str, dict]:
    """Each field's input on the page: bool, int, float or text (from the config schema), its choices and its
    default, so the page holds no copy of the schema."""
    import dataclasses
    import typing

    from lf_dist.config.schema import SECTIONS as SCHEMA

    out = {}
    for cls in SCHEMA.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in FIELDS:
                continue
            types = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
            kind = next(
                (t.__name__ for t in (bool, int, float) if types == {t} or (t is float and float in types)), "text"
            )
            default = f.default if f.default is not dataclasses.MISSING else None
            out[f.name] = {"kind": kind, "default": default if isinstance(default, (str, int, float, bool)) else None}
            if f.name in CHOICES:
                out[f.name]["choices"] = list(CHOICES[f.name])
    return out


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def raw_config(form: dict) -> dict:
    """The config keys of a form (blank fields left to their defaults), then its extra keys."""
    unknown = sorted(set(form) - set(FIELDS) - {"extra", "ranks"})
    if unknown:
        raise UserError(f"the form has fields lf-dist does not know: {', '.join(unknown)}")
    extra = form.get("extra") or {}
    if not isinstance(extra, dict):
        raise UserError("extra: expected a mapping of config keys")
    raw = {key: form[key] for key in FIELDS if key in form and not _blank(form[key])}
    raw.update({key: value for key, value in extra.items() if key not in raw})
    return raw


def ranks_of(form: dict) -> int:
    ranks = form.get("ranks")
    ranks = 1 if ranks in (None, "") else ranks
    if isinstance(ranks, str) and ranks.strip().isdigit():
        ranks = int(ranks)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise UserError(f"ranks: expected a whole number >= 1, got {ranks!r}")
    return ranks


def checked(form: dict, command: str = "train"):
    """The RunConfig of a form, checked key by key as `lf-dist <command>` checks a YAML (a UserError otherwise);
    for training, its datasets too (registered in dataset_dir's dataset_info.json), before anything is launched."""
    cfg = check_config(build_config(raw_config(form), source="web UI form", command=command), command)
    if command == "train":
        for names in (cfg.data.dataset, cfg.data.eval_dataset):
            get_dataset_attrs(names, cfg.data.dataset_dir)
    return cfg


def to_yaml(form: dict) -> str:
    """The form as a YAML file in the examples' layout: `### section` comments, keys in the form's order."""
    raw = raw_config(form)
    blocks = []
    for section, keys in SECTIONS:
        part = {key: raw.pop(key) for key in keys if key in raw}
        if part:
            blocks.append(f"### {section}\n" + yaml.safe_dump(part, sort_keys=False, allow_unicode=True))
    if raw:
        blocks.append("### other keys\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return "\n".join(blocks)


def from_yaml(path: str | Path, fields: tuple[str, ...] = TRAIN_FIELDS) -> dict:
    """A config file as a form: its keys of `fields` (the Train page's) fill the fields, the others are kept in
    `extra` and written back as they were."""
    raw = read_file(path)
    form = {key: raw.pop(key) for key in fields if key in raw}
    form["extra"] = raw
    return form
