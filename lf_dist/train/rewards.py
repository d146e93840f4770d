"""Reward functions: user code named in the config as `path.py:function`, loaded by file path and called per batch.

Two signatures are accepted, told apart by their parameters:
- the ppo_custom fork's per-sample `custom_reward(query: str, response: str) -> float` (query: the prompt as the
  model saw it, decoded without special tokens);
- TRL's batched `reward(prompts, completions, completion_ids, **columns) -> list[float | None]`, called with
  keywords: prompts (the queries above), completions (texts), completion_ids (token id lists) and the dataset's
  reference answer as `answer` and `solution`; None marks a completion the function does not score.

Every failure (raises, non-number, non-finite, wrong count) is one line naming the file, the function, the sample
and the start of its prompt. The caller all-reduces a failure flag, so one rank's failure stops every rank.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lf_dist.errors import UserError

PPO_CUSTOM_DEFAULT = "custom_rewards/reward_functions.py:custom_reward"


@dataclass(frozen=True)
class RewardFunction:
    name: str
    path: Path
    fn: object
    batched: bool

    @property
    def where(self) -> str:
        return f"{self.name} in {self.path}"


def _load_module(path: Path):
    name = f"lf_dist_rewards_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module: any error is theirs, reported in one line
        del sys.modules[name]
        raise UserError(f"reward_funcs: importing {path} failed: {type(err).__name__}: {err}") from None
    return module


def _is_batched(fn, where: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise UserError(f"reward_funcs: {where} has no inspectable signature") from None
    names = {p.name for p in params}
    if "completions" in names or any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) <= 2 <= len(positional) or any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    raise UserError(
        f"reward_funcs: {where} takes ({', '.join(names)}); expected (query, response) -> float, or TRL's "
        "(prompts, completions, completion_ids, **kwargs) -> list[float]"
    )


def load_reward_function(entry: str) -> RewardFunction:
    """`path.py:function` (path relative to the working directory) → the function, checked, not yet called."""
    path_text, sep, name = entry.rpartition(":")
    if not sep or not path_text or not name:
        raise UserError(f"reward_funcs: {entry!r} is not of the form path.py:function")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"reward_funcs: {path} not found (from {entry!r}, relative to {Path.cwd()})")
    module = _load_module(path)
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"reward_funcs: {path} has no function {name!r}")
    if not callable(fn):
        raise UserError(f"reward_funcs: {name} in {path} is not a function")
    where = f"{name} in {path}"
    return RewardFunction(name, path, fn, _is_batched(fn, where))


def load_reward_functions(entries: list[str]) -> list[RewardFunction]:
    return [load_reward_function(e) for e in entries]


class RewardFailure(Exception):
    """A reward function's mistake on this rank (the message is the one line the user sees)."""


def _prompt_start(query: str) -> str:
    text = " ".join(query.split())
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def _number(value, func: RewardFunction, i: int, query: str, none_ok: bool) -> float:
    if value is None and none_ok:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # a 0-d tensor or numpy scalar is a number
            import numbers

            if not isinstance(value, numbers.Real) and not (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
                raise TypeError
            value = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            raise RewardFailure(
                f"{func.where} returned {type(value).__name__} {str(value)[:40]!r}, not a number, for sample {i} "
                f"(prompt {_prompt_start(query)})"
            ) from None
    value = float(value)
    if not math.isfinite(value):
        raise RewardFailure(f"{func.where} returned {value} for sample {i} (prompt {_prompt_start(query)})")
    return value


def call_reward_function(
    func: RewardFunction,
    queries: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    answers: list[str],
) -> list[float]:
    """Rewards of one batch (NaN where a batched function returned None); RewardFailure names what went wrong."""
    n = len(completions)
    if not func.batched:
        out = []
        for i in range(n):
            try:
                value = func.fn(queries[i], completions[i])
            except Exception as err:  # noqa: BLE001 - user code: reported in one line, every rank stopped
                raise RewardFailure(
                    f"{func.where} raised {type(err).__name__}: {str(err)[:200]} on sample {i} "
                    f"(prompt {_prompt_start(queries[i])})"
                ) from None
            out.append(_number(value, func, i, queries[i], none_ok=False))
        return out
    try:
        values = func.fn(
            prompts=queries, completions=completions, completion_ids=completion_ids, answer=answers, solution=answers
        )
    except Exception as err:  # noqa: BLE001
        raise RewardFailure(
            f"{func.where} raised {type(err).__name__}: {str(err)[:200]} on a batch of {n} "
            f"(first prompt {_prompt_start(queries[0])})"
        ) from None
    try:
        values = list(values)
    except TypeError:
        raise RewardFailure(f"{func.where} returned {type(values).__name__}, not a list of {n} rewards") from None
    except Exception as err:  # noqa: BLE001 - a generator that raises: one line, every rank stopped
        raise RewardFailure(f"{func.where} raised {type(err).__name__}: {str(err)[:200]} on a batch of {n}") from None
    if len(values) != n:
        raise RewardFailure(f"{func.where} returned {len(values)} rewards for {n} completions")
    return [_number(v, func, i, queries[i], none_ok=True) for i, v in enumerate(values)]
