"""From a RunConfig to tokenized train / eval datasets (Hugging Face `datasets.Dataset`)."""

from __future__ import annotations

from dataclasses import dataclass

from lf_dist.config import RunConfig
from lf_dist.data.loader import _procs, load_aligned
from lf_dist.data.registry import get_dataset_attrs
from lf_dist.data.template import Template
from lf_dist.data.tokenize import is_valid, preprocess_pretrain, preprocess_supervised
from lf_dist.errors import UserError
from lf_dist.log import get_logger

logger = get_logger(__name__)


@dataclass
class DatasetBundle:
    train: object | None
    eval: object | None


def _tokenize(ds, cfg: RunConfig, tokenizer, template: Template, what: str):
    d, stage = cfg.data, cfg.finetuning.stage
    n = len(ds)
    ds = ds.filter(
        is_valid,
        fn_kwargs={"stage": stage},
        num_proc=_procs(d.preprocessing_num_workers, n),
        desc=f"Checking {what} examples",
    )
    if len(ds) < n:
        logger.warning(f"dropped {n - len(ds)} of {n} {what} examples that are malformed (role order, empty response)")
    if len(ds) == 0:
        raise UserError(f"dataset '{d.dataset if what == 'train' else d.eval_dataset}': no valid examples left")
    if stage == "pt":
        fn, kwargs = preprocess_pretrain, {"tokenizer": tokenizer, "cutoff_len": d.cutoff_len, "packing": d.packing}
    else:
        fn = preprocess_supervised
        kwargs = {
            "template": template,
            "tokenizer": tokenizer,
            "cutoff_len": d.cutoff_len,
            "train_on_prompt": d.train_on_prompt,
            "mask_history": d.mask_history,
        }
    ds = ds.map(
        fn,
        fn_kwargs=kwargs,
        batched=True,
        batch_size=d.preprocessing_batch_size,
        remove_columns=ds.column_names,
        num_proc=_procs(d.preprocessing_num_workers, len(ds)),
        load_from_cache_file=not d.overwrite_cache,
        desc=f"Tokenizing {what}",
    )
    ds = ds.filter(lambda ex: len(ex["input_ids"]) > 0 and any(x != -100 for x in ex["labels"]))
    if len(ds) == 0:
        raise UserError(f"no {what} example has a token to learn from after tokenization (cutoff_len {d.cutoff_len})")
    return ds


def build_datasets(cfg: RunConfig, tokenizer, template: Template) -> DatasetBundle:
    d, t = cfg.data, cfg.train
    train_ds = eval_ds = None
    if d.dataset:
        attrs = get_dataset_attrs(d.dataset, d.dataset_dir)
        aligned = load_aligned(attrs, d.max_samples, t.seed, d.preprocessing_num_workers, cfg.model.cache_dir)
        train_ds = _tokenize(aligned, cfg, tokenizer, template, "train")
        if d.val_size and not d.eval_dataset:
            size = int(d.val_size) if d.val_size >= 1 else d.val_size
            if (size if isinstance(size, int) else max(1, round(size * len(train_ds)))) >= len(train_ds):
                raise UserError(f"val_size: {d.val_size} leaves no training examples (of {len(train_ds)})")
            split = train_ds.train_test_split(test_size=size, seed=t.seed)
            train_ds, eval_ds = split["train"], split["test"]
    if d.eval_dataset:
        attrs = get_dataset_attrs(d.eval_dataset, d.dataset_dir)
        aligned = load_aligned(attrs, d.max_samples, t.seed, d.preprocessing_num_workers, cfg.model.cache_dir)
        eval_ds = _tokenize(aligned, cfg, tokenizer, template, "eval")
    return DatasetBundle(train_ds, eval_ds)
