"""Rollouts: completions sampled from the weights being trained, and the batches the update reads them in.

Sampling does not depend on the rank layout: each completion's random draws are keyed by (seed, step, prompt's
dataset index, sample number) and the token position, hashed into Gumbel noise that is added to the processed
logits (repetition penalty, temperature, top-k, top-p as transformers applies them) before taking the argmax,
which is an exact sample of the processed distribution. So a prompt gets the same completions on one process or
on any rank of any world size, and a resumed run draws what the uninterrupted one drew. Generation itself is the
strategy's (`Strategy.generate`: weights whole for the call, no collective per token).

`HFRollout` is the engine behind the `RolloutEngine` interface; a GPU engine (vLLM) can take its place later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lf_dist.data.tokenize import IGNORE_INDEX

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts signed integers arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps around, as the algorithm needs)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sample_keys(seed: int, step: int, indices: torch.Tensor, n_samples: int) -> torch.Tensor:
    """One int64 key per completion: prompt i's samples 0..n-1 consecutively ([len(indices) * n_samples])."""
    key = mix64(torch.tensor([_signed(seed)], dtype=torch.long))
    key = mix64(key ^ step)
    per_prompt = mix64(key ^ indices.to(torch.long).cpu())
    return mix64(per_prompt.repeat_interleave(n_samples) ^ torch.arange(n_samples).repeat(len(indices)))


def keyed_uniform(keys: torch.Tensor, position: int, size: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64 [len(keys), size]: a function of (key, position, column) alone."""
    counter = mix64(keys ^ position)[:, None] + torch.arange(size, device=keys.device)[None]
    bits = _shr(mix64(counter), 11).double()  # 53 random bits
    return (bits + 0.5) * 2.0**-53


class KeyedGumbel:
    """A logits processor: adds Gumbel noise keyed per completion and position, so the argmax that greedy
    decoding takes is a sample of the processed distribution."""

    def __init__(self, keys: torch.Tensor, prompt_length: int):
        self.keys, self.prompt_length = keys, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keys = self.keys.to(scores.device)
        u = keyed_uniform(keys, input_ids.shape[1] - self.prompt_length, scores.shape[-1])
        return scores.float() + (-torch.log(-torch.log(u))).float()


@dataclass(frozen=True)
class Sampling:
    """Generation settings of a rollout (LLaMA-Factory's generating keys; grpo's TRL defaults fill what is unset)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = True

    def processors(self, keys: torch.Tensor, prompt_length: int):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.do_sample:
            return out
        if self.temperature not in (0.0, 1.0):
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        out.append(KeyedGumbel(keys, prompt_length))
        return out


@dataclass
class Completions:
    """Prompts (left-padded, as generated from) and their completions (right-padded; `mask` marks tokens up to and
    including the one that ended it); `truncated`: no stop token within max_new_tokens."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(row[: int(n)], skip_special_tokens=True) for row, n in zip(self.ids, self.lengths)]

    def queries(self, tokenizer) -> list[str]:
        """The prompts as the model saw them, decoded without special tokens."""
        return [
            tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            for row, m in zip(self.prompt_ids, self.prompt_mask)
        ]

    def batch(self, pad_token_id: int) -> dict:
        """The update's rows: each prompt's real tokens, then its completion, right-padded; labels are the
        completion's tokens, so the scored positions are exactly the completion's."""
        rows, labels = [], []
        for p, pm, c, n in zip(self.prompt_ids, self.prompt_mask, self.ids, self.lengths):
            prompt, completion = p[pm.bool()], c[: int(n)]
            rows.append(torch.cat([prompt, completion]))
            labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion]))
        length = max(len(r) for r in rows)
        return {
            "input_ids": torch.stack([F.pad(r, (0, length - len(r)), value=pad_token_id) for r in rows]),
            "labels": torch.stack([F.pad(r, (0, length - len(r)), value=IGNORE_INDEX) for r in labels]),
        }


class RolloutEngine(Protocol):
    def generate(self, ctx, prompts: dict, keys: torch.Tensor, sampling: Sampling) -> Completions: ...


def _completions(prompt_ids, prompt_mask, output: torch.Tensor, stop_ids: list[int], pad_token_id: int) -> Completions:
    ids = output[:, prompt_ids.shape[1] :].cpu()
    if ids.shape[1] == 0:  # nothing generated (an engine that returns the prompts alone): empty, not ended
        return Completions(
            prompt_ids.cpu(), prompt_mask.cpu(), ids, torch.zeros_like(ids), torch.ones(len(ids), dtype=torch.bool)
        )
    is_stop = torch.isin(ids, torch.tensor(stop_ids))
    ended = is_stop.any(-1)
    first_stop = torch.where(ended, is_stop.int().argmax(-1), ids.shape[1] - 1)
    mask = (torch.arange(ids.shape[1])[None] <= first_stop[:, None]).long()
    return Completions(prompt_ids.cpu(), prompt_mask.cpu(), ids.masked_fill(mask == 0, pad_token_id), mask, ~ended)


class HFRollout:
    """Completions through transformers' `generate` on the strategy's training weights, greedy decoding of
    Gumbel-perturbed logits (the keyed sampling above)."""

    def generate(self, ctx, prompts: dict, keys: torch.Tensor, sampling: Sampling) -> Completions:
        from transformers import GenerationConfig

        tokenizer = ctx.tokenizer
        stop_ids = ctx.stop_ids or [tokenizer.eos_token_id]
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        # On a CPU, subnormal floats (attention weights of far-off tokens, small LoRA updates) slowed generation
        # 2-30x on some steps; flushed to zero for the rollout only (training keeps IEEE arithmetic).
        flush = ctx.strategy.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            output = ctx.strategy.generate(
                ctx.model,
                {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]},
                generation_config=config,
                logits_processor=sampling.processors(keys, prompts["input_ids"].shape[1]),
            )
        finally:
            if flush:
                torch.set_flush_denormal(False)
        return _completions(prompts["input_ids"], prompts["attention_mask"], output, stop_ids, tokenizer.pad_token_id)
