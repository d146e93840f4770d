"""Load registered local datasets with `datasets`, align their records and merge them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lf_dist.data.converters import convert
from lf_dist.data.registry import DatasetAttr
from lf_dist.errors import UserError, error_kinds
from lf_dist.hubs import modelscope_client, offline

FILE_TYPES = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def _files_of(attr: DatasetAttr) -> tuple[str, list[str]]:
    path = Path(attr.file_name)
    if attr.folder:
        path = path / attr.folder
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [str(path)]
    else:
        raise UserError(f"dataset '{attr.name}': file not found: {path}")
    types = {FILE_TYPES.get(Path(f).suffix.lower()) for f in files}
    if None in types or len(types) != 1:
        raise UserError(f"dataset '{attr.name}': files must share one of {', '.join(FILE_TYPES)} ({path})")
    return types.pop(), files


def _json_problem(path: str) -> str | None:
    """Name the line of the first JSON error in a .json/.jsonl file, or None if it parses."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if not stripped:
        return f"{path}: the file is empty"
    if stripped[0] == "[":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            return f"{path}: not valid JSON (line {err.lineno}: {err.msg})"
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}: not valid JSON (line {lineno}: {err.msg})"
    return None


def load_hub(attr: DatasetAttr, model_args=None):
    """A dataset repository on the Hugging Face Hub (or ModelScope), as LLaMA-Factory loads it: `subset` is the
    configuration, `folder` the data_dir, `split` the split."""
    cache_dir = getattr(model_args, "cache_dir", None)
    where = "ModelScope" if attr.load_from == "ms_hub" else "the Hugging Face Hub"
    try:
        if attr.load_from == "ms_hub":  # the repository's files through ModelScope's client, read by datasets
            return _load_folder(attr, _modelscope_dataset(attr, model_args), cache_dir)
        import datasets

        token = getattr(model_args, "hf_hub_token", None)
        return datasets.load_dataset(
            attr.file_name, name=attr.subset, data_dir=attr.folder, split=attr.split, cache_dir=cache_dir, token=token
        )
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - connection, not found, bad subset: one line each
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        kinds = error_kinds(err)
        if kinds & {"ConnectError", "ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "Timeout"}:
            first = f"{where} could not be reached ({first})"
        raise UserError(
            f"dataset '{attr.name}': cannot load '{attr.file_name}' from {where}: {first}; download it and register "
            "its files with file_name (or fill the cache and set HF_HUB_OFFLINE=1)"
        ) from None


def _modelscope_dataset(attr: DatasetAttr, model_args) -> str:
    """The dataset repository's folder in ModelScope's cache (its `MsDataset` needs an older datasets)."""
    download = modelscope_client("dataset_snapshot_download", f"dataset '{attr.name}'")
    cache_dir = getattr(model_args, "cache_dir", None)
    if offline():  # the client has no offline mode: the snapshot of its default branch, where it keeps it
        root = Path(cache_dir or os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))
        folder = root / "datasets" / attr.file_name.replace("/", "--") / "snapshots" / "master"
        if folder.is_dir():
            return str(folder)
        raise UserError(f"dataset '{attr.name}': HF_HUB_OFFLINE is set and {attr.file_name} is not in {root}")
    return download(attr.file_name, cache_dir=cache_dir, token=getattr(model_args, "ms_hub_token", None))


def _load_folder(attr: DatasetAttr, folder: str, cache_dir: str | None):
    import datasets

    return datasets.load_dataset(folder, name=attr.subset, data_dir=attr.folder, split=attr.split, cache_dir=cache_dir)


def load_raw(attr: DatasetAttr, cache_dir: str | None = None):
    import datasets

    kind, files = _files_of(attr)
    try:
        ds = datasets.load_dataset(kind, data_files=files, split=attr.split, name=attr.subset, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - turn any reader failure into one line naming the file
        if kind == "json":
            for f in files:
                problem = _json_problem(f)
                if problem:
                    raise UserError(f"dataset '{attr.name}': {problem}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"dataset '{attr.name}': cannot read {', '.join(files)} as {kind}: {first}") from None
    return ds


def load_source(attr: DatasetAttr, data_args, seed: int, model_args=None):
    """One registered dataset, sampled (num_samples, max_samples) and checked for its columns; not yet aligned.
    `model_args` gives the cache folder and hub tokens."""
    if attr.load_from == "file":
        ds = load_raw(attr, getattr(model_args, "cache_dir", None))
    else:
        ds = load_hub(attr, model_args)
    if attr.num_samples is not None:
        import numpy as np

        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(ds))[: attr.num_samples]
        if attr.num_samples > len(ds):  # resample with replacement to reach the requested size
            idx = np.concatenate([idx, rng.choice(len(ds), attr.num_samples - len(ds))])
        ds = ds.select(idx.tolist())
    if data_args.max_samples is not None:
        ds = ds.select(range(min(data_args.max_samples, len(ds))))
    missing = [c for c in _required_columns(attr) if c not in ds.column_names]
    if missing:
        raise UserError(f"dataset '{attr.name}': column(s) {', '.join(missing)} not found in {attr.file_name}")
    return ds


def align(ds, attr: DatasetAttr, num_proc):
    return ds.map(
        convert,
        fn_kwargs={"attr": attr},
        remove_columns=ds.column_names,
        num_proc=map_workers(num_proc, len(ds)),
        desc=f"Converting {attr.name}",
    )


def merge(parts: list, data_args, seed: int):
    """Several datasets into one: concatenated in order, or interleaved (mix_strategy), as LLaMA-Factory."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    if data_args.mix_strategy == "concat":
        return datasets.concatenate_datasets(parts)
    stopping = {
        "interleave_under": "first_exhausted",
        "interleave_over": "all_exhausted",
        "interleave_once": "all_exhausted_without_replacement",
    }[data_args.mix_strategy]
    probs = [float(p) for p in str(data_args.interleave_probs).split(",")] if data_args.interleave_probs else None
    return datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy=stopping)


def _required_columns(attr: DatasetAttr) -> list[str]:
    if attr.formatting == "alpaca":
        roles = (
            ["prompt"]
            + (["chosen", "rejected"] if attr.ranking else [])
            + (["kto_tag"] if "kto_tag" in attr.columns else [])
        )
    else:
        roles = ["messages"] + (["chosen", "rejected"] if attr.ranking else [])
    return [attr.columns[r] for r in roles if attr.columns.get(r)]


def map_workers(num_proc: int | None, n: int) -> int | None:
    """Worker processes for a `datasets.map` over n rows (None: in this process)."""
    # Worker processes only pay off on larger sets; datasets rejects more workers than rows.
    if not num_proc or num_proc <= 1 or n < 1000:
        return None
    return min(num_proc, n)
