"""A fresh machine installs what CI ran: every package of the test environment is pinned in locks/dev.txt (made
from pyproject.toml by `make lock`), `make install` installs exactly those, and torch stays its CPU build here."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

LOCK = ROOT / "locks" / "dev.txt"


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line  # a lock pins, it does not range
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_every_package_of_the_dev_extra_is_pinned_and_installed_at_its_pin():
    pins = _pins(LOCK)
    assert len(pins) > 100 and pins["torch"] == "2.13.0"
    for name in ("transformers", "peft", "datasets", "deepspeed", "ray", "trl", "bitsandbytes", "kernels", "pytest"):
        assert name in pins, name  # the dev extra's packages and what they pull in (kernels: transformers')
    # setuptools puts its own vendored copies (packaging, zipp, ...) on sys.path once it is imported (megatron-core
    # imports it): those are not what the environment installed
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if "_vendor" not in Path(str(getattr(d, "_path", ""))).parts
    }
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n, "").split("+")[0] != v}
    assert not wrong, f"installed versions differ from {LOCK.name} (run `make install`): {wrong}"


def test_the_lock_keeps_torchs_cpu_build_on_cpu_machines():
    text = LOCK.read_text(encoding="utf-8")
    assert not re.search(r"^(nvidia-|cuda-)", text, re.MULTILINE)  # no CUDA wheels are ever pulled in here
    import torch

    assert torch.__version__.startswith("2.13.0")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-r $(LOCK)" in makefile and "TORCH_BUILD ?= cpu" in makefile


def test_the_reference_venv_is_pinned_the_same_way():
    pins = _pins(ROOT / "locks" / "llamafactory.txt")
    assert pins["llamafactory"] == "0.9.5" and pins["torch"] == "2.13.0" and len(pins) > 50
