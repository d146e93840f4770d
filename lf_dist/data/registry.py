"""dataset_info.json → DatasetAttr: where a dataset lives and how its columns map to LLaMA-Factory's roles."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lf_dist.errors import UserError
from lf_dist.hubs import use_modelscope

FORMATS = ("alpaca", "sharegpt", "openai")
# Column and tag defaults per formatting, as LLaMA-Factory defines them.
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_COLUMNS = {"messages": "conversations"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
_COLUMN_KEYS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "chosen",
    "rejected",
    "kto_tag",
)
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_KNOWN = {"file_name", "formatting", "ranking", "columns", "tags", "split", "subset", "folder", "num_samples"}


@dataclass
class DatasetAttr:
    name: str
    file_name: str  # a local file or folder; the repository id where load_from is a hub
    load_from: str = "file"  # file | hf_hub | ms_hub (LLaMA-Factory's hf_hub_url / ms_hub_url)
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    folder: str | None = None
    num_samples: int | None = None


def load_registry(dataset_dir: str | Path) -> dict:
    if str(dataset_dir).startswith("REMOTE:"):  # LLaMA-Factory's hub folder of a dataset_info.json and its files
        raise UserError(
            f"dataset_dir: {dataset_dir} (a dataset_info.json in a hub repository) is not implemented by lf-dist; "
            f"download the repository (huggingface-cli download --repo-type dataset {str(dataset_dir)[7:]}) and "
            "set dataset_dir to that folder"
        )
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise UserError(f"dataset_dir: no dataset_info.json in {dataset_dir}")
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(registry, dict):
        raise UserError(f"{path}: expected an object mapping dataset names to their attributes")
    return registry


def get_dataset_attrs(names: str | None, dataset_dir: str | Path) -> list[DatasetAttr]:
    """Resolve comma-separated dataset names against dataset_info.json."""
    if not names:
        return []
    registry = load_registry(dataset_dir)
    attrs = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in registry:
            import difflib

            close = difflib.get_close_matches(name, list(registry), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"dataset '{name}' is not in {Path(dataset_dir) / 'dataset_info.json'}{hint}")
        attrs.append(_parse_entry(name, registry[name], dataset_dir))
    return attrs


def _source(name: str, entry: dict, dataset_dir: str | Path) -> tuple[str, str]:
    """(load_from, where) with LLaMA-Factory's precedence: a hub URL before file_name, ModelScope's with
    USE_MODELSCOPE_HUB=1 (or when it is the only one); a hub URL naming a local path is that path."""
    has = {k: entry[k] for k in _HUB_KEYS if entry.get(k)}
    if {"hf_hub_url", "ms_hub_url", "om_hub_url"} & set(has):
        if "ms_hub_url" in has and (use_modelscope() or "hf_hub_url" not in has):
            key, load_from = "ms_hub_url", "ms_hub"
        elif "hf_hub_url" in has:
            key, load_from = "hf_hub_url", "hf_hub"
        else:
            raise UserError(
                f"dataset '{name}' uses om_hub_url: lf-dist does not download from OpenMind; use file_name"
            )
        local = next((p for p in (Path(dataset_dir) / has[key], Path(has[key])) if p.exists()), None)
        return ("file", str(local.resolve())) if local is not None else (load_from, has[key])
    for key in ("script_url", "cloud_file_name"):
        if key in has:
            raise UserError(
                f"dataset '{name}' uses {key}: lf-dist does not run dataset scripts or read cloud storage; download "
                "the data and register it with file_name (or hf_hub_url)"
            )
    if "file_name" not in entry:
        raise UserError(f"dataset_info.json: entry '{name}' has no file_name (or hf_hub_url / ms_hub_url)")
    return "file", str(Path(dataset_dir) / entry["file_name"])


def _parse_entry(name: str, entry: dict, dataset_dir: str | Path) -> DatasetAttr:
    if not isinstance(entry, dict):
        raise UserError(f"dataset_info.json: entry '{name}' must be an object")
    load_from, source = _source(name, entry, dataset_dir)
    unknown = set(entry) - _KNOWN - set(_HUB_KEYS)
    if unknown:
        raise UserError(f"dataset_info.json: entry '{name}' has unknown attribute(s) {', '.join(sorted(unknown))}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise UserError(f"dataset_info.json: '{name}' formatting {formatting!r} is not one of {', '.join(FORMATS)}")
    columns = dict(entry.get("columns") or {})
    bad = set(columns) - set(_COLUMN_KEYS)
    if bad:
        raise UserError(f"dataset_info.json: '{name}' has unknown column role(s) {', '.join(sorted(bad))}")
    tags = dict(entry.get("tags") or {})
    bad = set(tags) - set(SHAREGPT_TAGS)
    if bad:
        raise UserError(f"dataset_info.json: '{name}' has unknown tag(s) {', '.join(sorted(bad))}")
    if formatting == "alpaca":
        columns = {**ALPACA_COLUMNS, **columns}
    else:
        openai = formatting == "openai"
        columns = {**({"messages": "messages"} if openai else SHAREGPT_COLUMNS), **columns}
        tags = {**(OPENAI_TAGS if openai else SHAREGPT_TAGS), **tags}
    return DatasetAttr(
        name=name,
        file_name=source,
        load_from=load_from,
        formatting=formatting,
        ranking=bool(entry.get("ranking", False)),
        columns=columns,
        tags=tags,
        split=entry.get("split", "train"),
        subset=entry.get("subset"),
        folder=entry.get("folder"),
        num_samples=entry.get("num_samples"),
    )
