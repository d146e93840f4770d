"""Prompt-only rows for the stages that generate their own answers (ppo, ppo_custom, grpo).

A record becomes the prompt a model answers (LLaMA-Factory's unsupervised encoding: the template's prompt of the
last turn, truncated with the answer's budget under cutoff_len) and keeps the dataset's reference answer as text,
which reward functions receive. The collator pads prompts on the left, as generation needs.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from lf_dist.data.converters import convert
from lf_dist.data.template_elements import Template
from lf_dist.data.tokenize import encode_turns, infer_seqlen


def is_valid_prompt(example: dict) -> bool:
    """A prompt record: user/assistant turns in order ending with a user turn; a reference answer is optional."""
    return len(example["_prompt"]) % 2 == 1 and len(example["_response"]) <= 1


def encode_prompt_records(batch: dict, attr, template: Template, tokenizer, data_args):
    """Raw records → one prompt row each (`input_ids`, `answer`); invalid ones come out empty, `_valid` False."""
    n = len(next(iter(batch.values())))
    aligned = [convert({k: v[i] for k, v in batch.items()}, attr) for i in range(n)]
    ids, answers, valid = [[] for _ in range(n)], [""] * n, [False] * n
    keep = [i for i, a in enumerate(aligned) if is_valid_prompt(a)]
    if keep:
        answers_in = [(aligned[i]["_response"] or [{"role": "assistant", "content": ""}])[0] for i in keep]
        turns = encode_turns(
            template,
            tokenizer,
            [aligned[i]["_prompt"] for i in keep],
            [[a] for a in answers_in],
            [aligned[i]["_system"] for i in keep],
            [aligned[i]["_tools"] for i in keep],
            discard_history_thought=True,
        )
        for i, pairs, answer in zip(keep, turns, answers_in):
            prompt = [t for source, target in pairs[:-1] for t in source + target] + pairs[-1][0]
            target = pairs[-1][1] + ([tokenizer.eos_token_id] if template.efficient_eos else [])
            source_len, _ = infer_seqlen(len(prompt), len(target), data_args.cutoff_len)
            ids[i], answers[i], valid[i] = prompt[:source_len], answer["content"], source_len > 0
    return pa.table(
        {
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "answer": pa.array(answers, type=pa.string()),
            "_valid": pa.array(valid),
        }
    )


class PromptCollator:
    """Prompts left-padded to the longest (`input_ids`, `attention_mask`), their reference answers as `answer`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            input_ids[i, length - len(ids) :] = ids
            attention_mask[i, length - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "answer": [r["answer"] for r in rows]}
