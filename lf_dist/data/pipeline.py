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
from lf_dist.data.loader import _procs, load_aligned
from lf_dist.data.packing import pack_dataset
from lf_dist.data.registry import get_dataset_attrs
from lf_dist.data.template import Template
from lf_dist.data.tokenize import IGNORE_INDEX, is_valid, preprocess_pretrain, preprocess_supervised
from lf_dist.errors import UserError
from lf_dist.log import get_logger

logger = get_logger(__name__)


@dataclass
class DatasetBundle:
    train: object | None
    eval: object | None


def _has_label(example: dict) -> bool:
    return len(example["input_ids"]) > 0 and any(x != IGNORE_INDEX for x in example["labels"])


def _tokenize(ds, cfg: RunConfig, tokenizer, template: Template, what: str):
    d, stage = cfg.data, cfg.finetuning.stage
    workers = _procs(d.preprocessing_num_workers, len(ds))
    if stage == "pt":
        fn = preprocess_pretrain
        kwargs = {"tokenizer": tokenizer, "cutoff_len": d.cutoff_len, "packing": d.packing, "template_name": d.template}
    else:
        fn = preprocess_supervised
        kwargs = {"template": template, "tokenizer": tokenizer, "cutoff_len": d.cutoff_len,
                  "train_on_prompt": d.train_on_prompt, "mask_history": d.mask_history}
    ds = ds.map(fn, fn_kwargs=kwargs, batched=True, batch_size=d.preprocessing_batch_size,
                remove_columns=ds.column_names, num_proc=workers, load_from_cache_file=not d.overwrite_cache,
                desc=f"Tokenizing {what}")
    ds = ds.filter(_has_label, num_proc=workers, desc=f"Checking {what} labels")
    if len(ds) == 0:
        raise UserError(f"no {what} example has a token to learn from after tokenization (cutoff_len {d.cutoff_len})")
    if d.packing and stage != "pt":
        ds = pack_dataset(ds, d.cutoff_len)
    return ds


def _drop_malformed(parts: dict, stage: str, num_proc) -> dict:
    counts, kept = {}, {}
    for name, ds in parts.items():
        valid = ds.filter(is_valid, fn_kwargs={"stage": stage}, num_proc=_procs(num_proc, len(ds)),
                          desc=f"Checking {name} examples")
        counts[name] = (len(ds) - len(valid), len(ds))
        kept[name] = valid
    dropped = sum(c[0] for c in counts.values())
    if dropped:
        detail = ", ".join(f"{n} of {t} {name}" for name, (n, t) in counts.items())
        logger.warning(f"dropped {dropped} malformed examples (role order, empty or missing response, bad kto_tag): "
                       f"{detail}")
    return kept


def _process(cfg: RunConfig, tokenizer, template: Template) -> DatasetBundle:
    d, t = cfg.data, cfg.train
    parts = {}
    if d.dataset:
        attrs = get_dataset_attrs(d.dataset, d.dataset_dir)
        parts["train"] = load_aligned(attrs, d, t.seed, cfg.model.cache_dir)
        if d.val_size > 1e-6:
            size = int(d.val_size) if d.val_size > 1 else d.val_size
            n = len(parts["train"])
            if (size if isinstance(size, int) else max(1, round(size * n))) >= n:
                raise UserError(f"val_size: {d.val_size} leaves no training examples (of {n})")
            split = parts["train"].train_test_split(test_size=size, seed=t.seed)
            parts["train"], parts["eval"] = split["train"], split["test"]
    if d.eval_dataset:
        parts["eval"] = load_aligned(get_dataset_attrs(d.eval_dataset, d.dataset_dir), d, t.seed, cfg.model.cache_dir)
    parts = _drop_malformed(parts, cfg.finetuning.stage, d.preprocessing_num_workers)
    for name, ds in parts.items():
        if len(ds) == 0:
            names = d.dataset if name == "train" else (d.eval_dataset or d.dataset)
            raise UserError(f"dataset '{names}': no valid {name} examples left")
        parts[name] = _tokenize(ds, cfg, tokenizer, template, name)
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


def _cache_dir(cfg: RunConfig, tokenizer, template: Template) -> Path:
    """A content key for the preprocessed data: config, template, tokenizer and the data files' size/mtime."""
    files = []
    for names in (cfg.data.dataset, cfg.data.eval_dataset):
        for attr in get_dataset_attrs(names, cfg.data.dataset_dir):
            p = Path(attr.file_name)
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file():
                    files.append((str(f), f.stat().st_size, f.stat().st_mtime_ns))
    key = json.dumps([asdict(cfg.data), cfg.finetuning.stage, cfg.train.seed, repr(template), files,
                      tokenizer.name_or_path, len(tokenizer), str(tokenizer.chat_template)], sort_keys=True, default=str)
    root = Path(os.environ.get("LF_DIST_CACHE", Path.home() / ".cache" / "lf_dist")) / "tokenized"
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def build_datasets(cfg: RunConfig, tokenizer, template: Template, world_size: int = 1) -> DatasetBundle:
    d = cfg.data
    path = Path(d.tokenized_path) if d.tokenized_path else None
    if path is not None and _is_saved(path):
        logger.info(f"loading tokenized data from {path} (dataset and preprocessing keys are not used)")
        return load_bundle(path)
    if world_size == 1:
        bundle = _process(cfg, tokenizer, template)
        if path is not None:
            save_bundle(bundle, path)
            logger.info(f"tokenized data saved to {path}")
        return bundle
    from filelock import FileLock

    path = path or _cache_dir(cfg, tokenizer, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # the first rank here preprocesses; the others block, then load
        if not _is_saved(path):
            save_bundle(_process(cfg, tokenizer, template), path)
    return load_bundle(path)
