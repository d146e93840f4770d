"""A form's plan, as `lf-dist plan` makes it for the ranks the form asks for, and the command line that runs it."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

from lf_dist.webui.forms import checked, ranks_of

_ENV = threading.Lock()  # the launch contract is read from the environment: one plan at a time sets it


@functools.lru_cache(maxsize=1)
def _hardware():
    from lf_dist.planner import detect

    return detect()


def launch_env(ranks: int) -> dict[str, str]:
    """The launch contract of `ranks` processes on this machine (LLaMA-Factory's variables)."""
    return {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(ranks)} if ranks > 1 else {}


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    with _ENV:
        saved = {key: os.environ.get(key) for key in ("FORCE_TORCHRUN", "NPROC_PER_NODE")}
        for key in saved:
            os.environ.pop(key, None)
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None)
                if value is not None:
                    os.environ[key] = value


def command_line(yaml_path: str, ranks: int) -> str:
    env = " ".join(f"{k}={v}" for k, v in launch_env(ranks).items())
    return f"{env + ' ' if env else ''}lf-dist train {yaml_path}"


def plan_form(form: dict) -> dict:
    """The plan of a form: its JSON (`lf-dist plan --json`), its lines (`lf-dist plan`) and whether it fits."""
    from lf_dist.planner import make_plan
    from lf_dist.planner.report import report
    from lf_dist.train.stages import get_stage

    cfg = checked(form)
    ranks = ranks_of(form)
    hw = _hardware()
    with _environ(launch_env(ranks)):
        plan = make_plan(cfg, hw, get_stage(cfg.finetuning.stage))
    return {"fits": plan.fits, "plan": plan.to_dict(), "lines": report(plan, hw)}
