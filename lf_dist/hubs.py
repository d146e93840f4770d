"""What downloading from a hub needs everywhere (model/ for models, data/ for datasets): LLaMA-Factory's switch to
ModelScope, offline mode, and ModelScope's client, an optional extra."""

from __future__ import annotations

import logging
import os

from lf_dist.errors import UserError


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "y", "yes", "on")


def use_modelscope() -> bool:
    """USE_MODELSCOPE_HUB=1: hub names and ms_hub_url datasets come from ModelScope (LLaMA-Factory's switch)."""
    return _env_on("USE_MODELSCOPE_HUB")


def offline() -> bool:
    """HF_HUB_OFFLINE=1: only what is in the caches (ModelScope has no switch of its own; lf-dist uses this one)."""
    return _env_on("HF_HUB_OFFLINE")


def modelscope_client(function: str, what: str):
    """A function of the modelscope package, with its info lines kept off the console."""
    try:
        import modelscope
    except ImportError:
        raise UserError(
            f"USE_MODELSCOPE_HUB / ms_hub_url: {what} needs the modelscope package (pip install 'lf-dist[modelscope]')"
        ) from None
    for name in ("modelscope", "modelscope_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return getattr(modelscope, function)
