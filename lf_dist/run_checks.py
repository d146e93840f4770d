"""A run's config: read and checked key by key by config/, then by the rules of its stage and of the data
names it uses. Every entry point (CLI, torchrun ranks, tests) loads configs through `load_config`, so a
user's mistake is caught here, once, before anything starts.
"""

from __future__ import annotations

from pathlib import Path

from lf_dist.config import RunConfig, read_config
from lf_dist.data.tool_formats import TOOL_FORMATS
from lf_dist.errors import UserError
from lf_dist.parallel.registry import check_config as check_backend
from lf_dist.train.stages import check_stage_config


def load_config(path: str | Path | None, overrides: list[str] | None = None, command: str = "train") -> RunConfig:
    """Read a config file, apply `key=value` overrides, fill LLaMA-Factory defaults and check everything that
    `command` (train, chat, api, export) reads."""
    return check_config(read_config(path, overrides, command), command)


def check_config(cfg: RunConfig, command: str = "train") -> RunConfig:
    """The checks past config/'s own, for a config built by `read_config` or `build_config` (the web UI's)."""
    check_backend(cfg)
    if command == "train":
        cfg = check_stage_config(cfg)
    tool_format = cfg.data.tool_format
    if tool_format is not None and tool_format not in TOOL_FORMATS:
        raise UserError(f"tool_format: {tool_format!r} is not one of {', '.join(TOOL_FORMATS)}")
    return cfg
