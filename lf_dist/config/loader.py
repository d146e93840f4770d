"""YAML/JSON file + `key=value` overrides → RunConfig, with LLaMA-Factory's key names and friendly errors."""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path

import yaml

from lf_dist.config.known_keys import (
    ALWAYS_ON,
    HF_TRAINING_ARGS,
    LF_KEYS,
    LF_NO_EFFECT,
    MULTIMODAL_KEYS,
    REFUSED_WHEN_SET,
    is_hf_training_arg,
)
from lf_dist.config.schema import ALIASES, SECTIONS, RunConfig, key_owner, sections_read
from lf_dist.config.validate import validate
from lf_dist.errors import UserError


def read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(err, "lineno", "?")
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} (line {line})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; values are YAML-typed (5e-4 → float, true → bool, [a, b] → list)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _suggest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(key: str, value, annotation):
    """Convert a YAML value to the field's declared type, or explain what was expected."""
    hint = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in hint:
            return None
        raise UserError(f"{key}: a value is required")
    for typ in hint:
        if typ is type(None):
            continue
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif typ is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:  # YAML 1.1 reads "5e-5" as a string; LLaMA-Factory accepts it as a number.
                    return float(value)
                except ValueError:
                    pass
        elif typ is str:
            if isinstance(value, str):
                return value
            if value is False and key.endswith("_strategy"):  # YAML 1.1 reads `save_strategy: no` as false
                return "no"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        elif typ in (list, dict) and isinstance(value, typ):
            return value
    names = " or ".join(t.__name__ for t in hint if t is not type(None))
    raise UserError(f"{key}: expected {names}, got {value!r}")


def build_config(raw: dict, source: str | None = None, command: str = "train") -> RunConfig:
    """`command` (train, chat, api, export) names the sections that matter: a valid key of another section (a
    learning rate given to chat, a temperature given to train) is reported as having no effect, not dropped."""
    owners = key_owner()
    cfg = RunConfig(source=source, command=command)
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    stage = raw.get("stage", cfg.finetuning.stage)
    predict = raw.get("do_predict") in (True, "true", "True")  # generates: reads the generation keys
    for key, value in raw.items():
        key = ALIASES.get(key, key)
        section = owners.get(key)
        if section is not None:
            setattr(getattr(cfg, section), key, _coerce(key, value, hints[section][key]))
            cfg.given.add(key)
            if section not in sections_read(command, stage, predict):
                cfg.ignored[key] = value
        elif key in ALWAYS_ON and value in (True, "true", "True", "all", "non_padding"):
            continue
        elif key in REFUSED_WHEN_SET and value not in (None, False, "false", "False"):
            raise UserError(REFUSED_WHEN_SET[key])
        elif key in LF_NO_EFFECT:
            cfg.ignored[key] = value
        elif key in MULTIMODAL_KEYS:
            raise UserError(
                f"'{key}': multimodal training (vision towers, images, videos) is not implemented by lf-dist, which "
                "trains text models"
            )
        elif key in LF_KEYS:
            raise UserError(
                f"'{key}' is a LLaMA-Factory option that lf-dist does not implement; remove it to continue"
            )
        elif is_hf_training_arg(key):
            cfg.ignored[key] = value
        else:
            candidates = sorted(set(owners) | set(LF_KEYS) | set(HF_TRAINING_ARGS))
            raise UserError(f"unknown key '{key}'{_suggest(key, candidates)}")
    return validate(cfg)


def read_config(path: str | Path | None, overrides: list[str] | None = None, command: str = "train") -> RunConfig:
    """Read a config file, apply overrides, fill LLaMA-Factory defaults and check the values config/ knows.

    A run's config comes from `lf_dist.run_checks.load_config`, which adds the stage's own checks."""
    raw = read_file(path) if path is not None else {}
    raw.update(parse_overrides(overrides or []))
    return build_config(raw, source=str(path) if path is not None else None, command=command)
