"""From a RunConfig to tokenized train / eval datasets, in LLaMA-Factory's order.

load + align each dataset → merge → split val_size (on aligned records, as LLaMA-Factory, so the same
examples land in eval) → drop malformed records (one summary line) → tokenize → pack. With `tokenized_path`
the result is saved once and later runs load it. With several ranks one process does the work while the
others wait on a file lock — not on a collective, so a long preprocessing cannot trip the process-group
timeout — and then load the saved result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from lf_dist.config import RunConfig
from lf_dist.data.kinds import DataKind, row_layout
from lf_dist.data.loader import align, load_source, map_workers, merge
from lf_dist.data.registry import get_dataset_attrs
from lf_dist.data.template_elements import Template
from lf_dist.data.tokenize import IGNORE_INDEX, is_valid_text, preprocess_pretrain
from lf_dist.errors import UserError
from lf_dist.log import get_logger

logger = get_logger(__name__)


@dataclass
class DatasetBundle:
    train: object | None
    eval: object | None


def _has_label(example: dict) -> bool:
    return len(example["input_ids"]) > 0 and any(x != IGNORE_INDEX for x in example["labels"])


def _dataset_attrs(names: str, cfg: RunConfig, kind: DataKind):
    """The registered datasets, each of the kind the stage trains on (pairs need "ranking": true, and only
    pairs have it)."""
    attrs = get_dataset_attrs(names, cfg.data.dataset_dir)
    stage = cfg.finetuning.stage
    for attr in attrs:
        if kind.ranking and not attr.ranking:
            raise UserError(
                f"dataset '{attr.name}': stage {stage} trains on pairs of answers (chosen and rejected), and this "
                'dataset is not registered as pairwise; in dataset_info.json add "ranking": true to its entry and '
                'name its answer columns, e.g. "columns": {"prompt": "instruction", "chosen": "chosen", '
                '"rejected": "rejected"}'
            )
        if attr.ranking and not kind.ranking:
            raise UserError(
                f"dataset '{attr.name}' is registered as pairwise (\"ranking\": true: chosen and rejected answers), "
                f"but stage {stage} trains on single answers; use it with stage dpo or rm, or use another dataset"
            )
    return attrs


def _encode_sources(names: str, cfg: RunConfig, tokenizer, template: Template, kind: DataKind, what: str):
    """Each registered dataset encoded record by record, then merged as LLaMA-Factory merges them."""
    data_args = cfg.data
    parts = []
    for attr in _dataset_attrs(names, cfg, kind):
        raw = load_source(attr, data_args, cfg.train.seed, cfg.model)
        parts.append(
            raw.map(
                kind.encode,
                fn_kwargs={"attr": attr, "template": template, "tokenizer": tokenizer, "data_args": data_args},
                batched=True,
                batch_size=data_args.preprocessing_batch_size,
                remove_columns=raw.column_names,
                num_proc=map_workers(data_args.preprocessing_num_workers, len(raw)),
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing {attr.name} ({what})",
            )
        )
    return merge(parts, data_args, cfg.train.seed)


def _align_sources(names: str, cfg: RunConfig, kind: DataKind):
    data_args = cfg.data
    parts = [
        align(load_source(a, data_args, cfg.train.seed, cfg.model), a, data_args.preprocessing_num_workers)
        for a in _dataset_attrs(names, cfg, kind)
    ]
    return merge(parts, data_args, cfg.train.seed)


def _pretrain_tokenize(ds, cfg: RunConfig, tokenizer, what: str):
    """pt: texts + eos, joined into cutoff_len blocks when packing; invalid (empty) texts dropped first."""
    data_args = cfg.data
    ds = ds.map(
        lambda b: {"_valid": [is_valid_text({"_prompt": p}) for p in b["_prompt"]]},
        batched=True,
    )
    ds = _keep_valid(ds)
    kwargs = {
        "tokenizer": tokenizer,
        "cutoff_len": data_args.cutoff_len,
        "packing": data_args.packing,
        "template_name": data_args.template,
    }
    ds = ds.map(
        preprocess_pretrain,
        fn_kwargs=kwargs,
        batched=True,
        batch_size=data_args.preprocessing_batch_size,
        remove_columns=ds.column_names,
        num_proc=map_workers(data_args.preprocessing_num_workers, len(ds)),
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"Tokenizing {what}",
    )
    return ds.filter(_has_label, desc=f"Checking {what} blocks")


def _keep_valid(ds):
    return ds.filter(lambda valid: valid, input_columns=["_valid"], batched=True).remove_columns("_valid")


def _process(cfg: RunConfig, tokenizer, template: Template, kind: DataKind) -> DatasetBundle:
    data_args, training_args = cfg.data, cfg.train
    text = kind.encode is None  # texts are aligned now and tokenized into blocks after the split
    source = (
        (lambda names, what: _align_sources(names, cfg, kind))
        if text
        else (lambda names, what: _encode_sources(names, cfg, tokenizer, template, kind, what))
    )
    parts = {}
    if data_args.dataset:
        parts["train"] = source(data_args.dataset, "train")
        if data_args.val_size > 1e-6:  # split by record, before dropping anything, exactly as LLaMA-Factory splits
            size = int(data_args.val_size) if data_args.val_size > 1 else data_args.val_size
            n = len(parts["train"])
            if (size if isinstance(size, int) else max(1, round(size * n))) >= n:
                raise UserError(f"val_size: {data_args.val_size} leaves no training examples (of {n})")
            split = parts["train"].train_test_split(test_size=size, seed=training_args.seed)
            parts["train"], parts["eval"] = split["train"], split["test"]
    if data_args.eval_dataset:
        parts["eval"] = source(data_args.eval_dataset, "eval")
    counts = {}
    for name, ds in parts.items():
        before = len(ds)
        parts[name] = _pretrain_tokenize(ds, cfg, tokenizer, name) if text else _keep_valid(ds)
        counts[name] = (before - len(parts[name]), before) if not text else (0, before)
        if len(parts[name]) == 0:
            names = data_args.dataset if name == "train" else (data_args.eval_dataset or data_args.dataset)
            raise UserError(
                f"dataset '{names}': no valid {name} examples left (malformed, or nothing to learn "
                f"within cutoff_len {data_args.cutoff_len})"
            )
    dropped = sum(c[0] for c in counts.values())
    if dropped:
        detail = ", ".join(f"{n} of {total} {name}" for name, (n, total) in counts.items())
        logger.warning(
            f"dropped {dropped} examples that are malformed (role order, empty or missing response, bad "
            f"kto_tag) or have nothing to learn within cutoff_len: {detail}"
        )
    if data_args.packing and kind.pack is not None:
        parts = {name: kind.pack(ds, data_args.cutoff_len) for name, ds in parts.items()}
    return DatasetBundle(parts.get("train"), parts.get("eval"))


# -- saving, loading and sharing between ranks ------------------------------------------------------------
def _is_saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def save_bundle(bundle: DatasetBundle, path: Path) -> None:
    """save_to_disk under a temporary name, then rename: a crash never leaves a half dataset that looks done."""
    import datasets

    splits = {"train": bundle.train, "validation": bundle.eval}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.DatasetDict({k: v for k, v in splits.items() if v is not None}).save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_bundle(path: Path) -> DatasetBundle:
    import datasets

    saved = datasets.load_from_disk(str(path))
    return DatasetBundle(saved.get("train"), saved.get("validation"))


def _cache_dir(cfg: RunConfig, tokenizer, template: Template, kind: DataKind) -> Path:
    """A content key for the preprocessed data: config, template, tokenizer and the data files' size/mtime."""
    files = []
    for names in (cfg.data.dataset, cfg.data.eval_dataset):
        for attr in get_dataset_attrs(names, cfg.data.dataset_dir):
            if attr.load_from != "file":  # a hub dataset: its name and selection (the hub's cache holds the files)
                files.append((attr.load_from, attr.file_name, attr.subset, attr.folder, attr.split))
                continue
            p = Path(attr.file_name)
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file():
                    files.append((str(f), f.stat().st_size, f.stat().st_mtime_ns))
    key = json.dumps(
        [
            asdict(cfg.data),
            kind.name,
            cfg.train.seed,
            repr(template),
            files,
            tokenizer.name_or_path,
            len(tokenizer),
            str(tokenizer.chat_template),
        ],
        sort_keys=True,
        default=str,
    )
    root = Path(os.environ.get("LF_DIST_CACHE", Path.home() / ".cache" / "lf_dist")) / "tokenized"
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def build_datasets(
    cfg: RunConfig, tokenizer, template: Template, kind: DataKind, world_size: int = 1
) -> DatasetBundle:
    """The train / eval rows of `kind` (the stage's data kind) for this config; `world_size` processes share
    one preprocessing."""
    data_args = cfg.data
    path = Path(data_args.tokenized_path) if data_args.tokenized_path else None
    if path is not None and _is_saved(path):
        logger.info(f"loading tokenized data from {path} (dataset and preprocessing keys are not used)")
        return _check_layout(load_bundle(path), kind, cfg.finetuning.stage, path)
    if world_size == 1:
        bundle = _process(cfg, tokenizer, template, kind)
        if path is not None:
            save_bundle(bundle, path)
            logger.info(f"tokenized data saved to {path}")
        return bundle
    path = path or _cache_dir(cfg, tokenizer, template, kind)
    if prepare_shared(path, lambda: save_bundle(_process(cfg, tokenizer, template, kind), path)):
        logger.info(f"tokenized data prepared for all ranks at {path}")
    return load_bundle(path)


def _check_layout(bundle: DatasetBundle, kind: DataKind, stage: str, path: Path) -> DatasetBundle:
    """Rows tokenized for one kind of data cannot feed another (supervised rows have no chosen/rejected pairs)."""
    expected = row_layout(kind)
    found = row_layout(bundle.train.column_names) if bundle.train is not None else expected
    if found != expected:
        raise UserError(
            f"tokenized_path: {path} holds {found} rows but stage {stage} needs {expected} rows; "
            "use another tokenized_path or delete this one"
        )
    return bundle


def prepare_shared(path: Path, build) -> bool:
    """Run `build` (which must create `path`) in exactly one of the processes that share `path`.

    The first process to take the file lock builds; the others block on the lock — not on a collective, so a
    preprocessing that takes hours cannot trip the process group's timeout — and find the result done. If the
    builder dies, the lock is released and the next process builds. Returns whether this process built.
    """
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if _is_saved(path):
            return False
        build()
        return True
