"""What ppo, ppo_custom and grpo share: generating a rollout, scoring it, global batch statistics and its logs.

A rollout step: the loader's prompt micro-batches of this rank are answered (each prompt `n` times, consecutively,
so a grpo group stays on its rank), the completions are scored by reward functions or a reward model, and the
statistics that span the batch are reduced over every rank, so 2 ranks compute what 1 process does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lf_dist.errors import UserError
from lf_dist.parallel.base import add_metrics
from lf_dist.train.losses import metric, model_inputs
from lf_dist.train.rewards import RewardFailure, RewardFunction, call_reward_function
from lf_dist.train.rollout import Completions, HFRollout, Sampling, sample_keys
from lf_dist.train.token_logps import logps_and_entropy, scored_logits


@dataclass
class Rollout:
    """One prompt micro-batch's completions and what the scorers said of them."""

    completions: Completions
    answers: list[str]
    queries: list[str]
    texts: list[str]
    batch: dict  # the update's rows (input_ids, labels) on the CPU


def sampling_of(cfg, rl_defaults: dict | None = None) -> Sampling:
    """The generation keys of the config; `rl_defaults` fill the ones the user left unset (grpo: TRL's)."""
    gen = cfg.generation
    values = {k: getattr(gen, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")}
    values["do_sample"] = gen.do_sample and gen.temperature > 0
    for key, value in (rl_defaults or {}).items():
        if key not in cfg.given:  # max_completion_length is given as max_new_tokens (an alias)
            values[key] = value
    return Sampling(**values)


def _left_padded(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (width - t.shape[1], 0), value=value) for t in tensors])


def generate(ctx, batches: list[dict], n: int, sampling: Sampling, engine=None) -> list[Rollout]:
    """Every prompt of `batches` answered `n` times (keyed by seed, step, dataset index and sample), all of the
    step's prompts in one call (decoding is latency-bound: one pass of new tokens for the whole step), then split
    back into the micro-batches."""
    engine = engine or HFRollout()
    tokenizer, out = ctx.tokenizer, []
    prompts = {
        "input_ids": _left_padded([b["input_ids"].repeat_interleave(n, 0) for b in batches], tokenizer.pad_token_id),
        "attention_mask": _left_padded([b["attention_mask"].repeat_interleave(n, 0) for b in batches], 0),
    }
    keys = torch.cat([sample_keys(ctx.seed, ctx.step, b["index"], n) for b in batches])
    everything = engine.generate(ctx, prompts, keys, sampling)
    ctx.totals["generated_tokens"] = ctx.totals.get("generated_tokens", 0) + int(everything.lengths.sum())
    start = 0
    for b in batches:
        rows = slice(start, start + len(b["index"]) * n)
        start = rows.stop
        completions = Completions(*(getattr(everything, f.name)[rows] for f in dataclasses.fields(Completions)))
        out.append(
            Rollout(
                completions,
                [a for a in b["answer"] for _ in range(n)],
                completions.queries(tokenizer),
                completions.texts(tokenizer),
                completions.batch(tokenizer.pad_token_id),
            )
        )
    return out


def score_with_functions(ctx, rollouts: list[Rollout], funcs: list[RewardFunction]) -> list[torch.Tensor]:
    """Each rollout's rewards per function [n, F] (NaN: None). A failure on any rank stops every rank: the flag
    is all-reduced after scoring, and the rank that failed names the function, sample and prompt."""
    failure, out = None, []
    for r in rollouts:
        ids = [row[: int(k)].tolist() for row, k in zip(r.completions.ids, r.completions.lengths)]
        columns = []
        for func in funcs:
            try:
                columns.append(
                    call_reward_function(func, r.queries, r.texts, ids, r.answers) if failure is None else []
                )
            except RewardFailure as err:
                failure = str(err)
        out.append(torch.tensor(columns, dtype=torch.float32).T if failure is None else None)
    failed = int(ctx.strategy.all_reduce_sum(torch.tensor(float(failure is not None))))
    if failed:  # every rank stops with the first failing rank's message, whichever rank's line the user sees
        failure = next(m for m in ctx.strategy.gather_objects(failure) if m is not None)
        raise UserError(f"reward_funcs: {failure}")
    return out


def record(ctx, rollouts: list[Rollout], batches: list[dict], rewards: list[torch.Tensor]) -> None:
    """`log_completions`: each completion of the step with its prompt and reward, one JSON line each, written by
    the main rank in (dataset index, sample) order whatever the rank layout."""
    if ctx.completions_file is None:
        return
    mine = []
    for r, b, reward in zip(rollouts, batches, rewards):
        n = len(r.texts) // len(b["index"])
        for i, text in enumerate(r.texts):
            ids = r.completions.ids[i, : int(r.completions.lengths[i])].tolist()
            value = float(reward[i])
            mine.append(
                {
                    "step": ctx.step + 1,
                    "index": int(b["index"][i // n]),
                    "sample": i % n,
                    "prompt": r.queries[i],
                    "completion": text,
                    "completion_ids": ids,
                    "reward": None if math.isnan(value) else value,
                }
            )
    everything = [x for part in ctx.strategy.gather_objects(mine) for x in part]
    if ctx.strategy.is_main:
        everything.sort(key=lambda x: (x["index"], x["sample"]))
        with open(ctx.completions_file, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(x) + "\n" for x in everything)


def drop_records_after(path, step: int) -> None:
    """On resume: the rollouts recorded after the checkpoint's step go (they are generated again)."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(x for x in lines if json.loads(x)["step"] <= step), encoding="utf-8")


def global_moments(ctx, values: torch.Tensor) -> tuple[float, float, int]:
    """Mean, Bessel std and count of the non-NaN `values` of every rank."""
    finite = values[~torch.isnan(values)].double()
    moments = torch.stack([finite.sum(), (finite**2).sum(), torch.tensor(float(finite.numel()), dtype=torch.float64)])
    total, squares, n = (float(x) for x in ctx.strategy.all_reduce_sum(moments.to(ctx.strategy.device)).cpu())
    mean = total / n if n else math.nan
    var = (squares - n * mean * mean) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(max(var, 0.0)) if n > 1 else math.nan, int(n)


def log_value(ctx, name: str, value: float) -> None:
    """A value every rank holds alike (a global statistic): logged as itself after the ranks' mean."""
    if not math.isnan(value):
        add_metrics(ctx.metrics, {name: metric(torch.tensor(float(value)), 1)})


def log_lengths(ctx, rollouts: list[Rollout]) -> None:
    """TRL's completion-length logs over the global batch."""
    lengths = torch.cat([r.completions.lengths for r in rollouts]).double()
    truncated = torch.cat([r.completions.truncated for r in rollouts]).double()
    strategy = ctx.strategy
    sums = strategy.all_reduce_sum(torch.stack([lengths.sum(), truncated.sum(), torch.tensor(float(len(lengths)))]))
    lo = min(strategy.gather(float(lengths.min())))
    hi = max(strategy.gather(float(lengths.max())))
    log_value(ctx, "completions/mean_length", float(sums[0] / sums[2]))
    log_value(ctx, "completions/min_length", lo)
    log_value(ctx, "completions/max_length", hi)
    log_value(ctx, "completions/clipped_ratio", float(sums[1] / sums[2]))


class Clock:
    """Seconds spent in each phase of a step, logged as time/<phase> and summed for all_results.json."""

    def __init__(self, ctx):
        self.ctx, self.start = ctx, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.ctx.strategy.device.type == "cuda":  # the phase's kernels, not the next phase's wait, count here
            torch.cuda.synchronize(self.ctx.strategy.device)
        now = time.perf_counter()
        add_metrics(self.ctx.metrics, {f"time/{phase}": metric(torch.tensor(now - self.start), 1)})
        self.ctx.totals[f"{phase}_s"] = self.ctx.totals.get(f"{phase}_s", 0.0) + now - self.start
        self.start = now


def completion_logps(model, batch: dict, temperature: float, value_head=None):
    """Token log-probs and entropies of the completion tokens of `batch` (flat, row-major), and values if asked."""
    scored = scored_logits(model, model_inputs(batch), batch["labels"], value_head)
    targets = batch["labels"][:, 1:][scored.mask]
    logps, entropy = logps_and_entropy(scored.logits, targets, temperature)
    return logps, entropy, scored.mask, scored.values


def as_rows(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values (row-major over `mask`) laid out as [B, T-1], zeros elsewhere."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out
