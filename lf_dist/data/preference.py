"""Tokenize ranking (chosen / rejected) and feedback (answer + desirable tag) records, with LLaMA-Factory's rules.

Pairwise rows: prompt + chosen and prompt + rejected, the prompt truncated once for both (the longer
answer sets the budget), labels masking the prompt — LLaMA-Factory's `chosen_*` / `rejected_*` columns.
Feedback rows: prompt + answer with `kto_tags` (True = desirable). The mismatched pairs that estimate KTO's
KL term are formed per batch by the collator (TRL's rule), not here.
"""

from __future__ import annotations

import pyarrow as pa

from lf_dist.data.converters import convert
from lf_dist.data.template_elements import Template
from lf_dist.data.tokenize import IGNORE_INDEX, as_arrow_table, encode_turns, infer_seqlen


def _one_turn(template: Template, tokenizer, prompts, answers, systems, tools) -> list[tuple[list, list]]:
    """LLaMA-Factory's encode_oneturn for a batch: (all turns but the last answer, the last answer)."""
    turns = encode_turns(
        template, tokenizer, prompts, [[a] for a in answers], systems, tools, discard_history_thought=True
    )
    out = []
    for pairs in turns:
        prompt = [t for source, target in pairs[:-1] for t in source + target] + pairs[-1][0]
        out.append((prompt, pairs[-1][1]))
    return out


def _efficient_eos(template: Template, tokenizer, ids: list[int]) -> list[int]:
    return ids + [tokenizer.eos_token_id] if template.efficient_eos else ids


def encode_pairwise(columns: dict, template: Template, tokenizer, cutoff_len: int) -> list[dict]:
    """Aligned ranking examples → chosen/rejected input_ids and labels (prompt masked)."""
    args = (columns["_prompt"], columns["_system"], columns["_tools"])
    chosen = _one_turn(template, tokenizer, args[0], [r[0] for r in columns["_response"]], *args[1:])
    rejected = _one_turn(template, tokenizer, args[0], [r[1] for r in columns["_response"]], *args[1:])
    rows = []
    for (prompt, chosen_ids), (_, rejected_ids) in zip(chosen, rejected):
        chosen_ids = _efficient_eos(template, tokenizer, chosen_ids)
        rejected_ids = _efficient_eos(template, tokenizer, rejected_ids)
        source_len, target_len = infer_seqlen(len(prompt), max(len(chosen_ids), len(rejected_ids)), cutoff_len)
        prompt, chosen_ids, rejected_ids = prompt[:source_len], chosen_ids[:target_len], rejected_ids[:target_len]
        rows.append(
            {
                "chosen_input_ids": prompt + chosen_ids,
                "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen_ids,
                "rejected_input_ids": prompt + rejected_ids,
                "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected_ids,
            }
        )
    return rows


def encode_feedback(columns: dict, template: Template, tokenizer, cutoff_len: int) -> list[dict]:
    """Aligned kto examples ([answer, ""] desirable, ["", answer] undesirable) → input_ids, labels, kto_tags."""
    tags = [bool(r[0]["content"]) for r in columns["_response"]]
    answers = [r[0] if tag else r[1] for r, tag in zip(columns["_response"], tags)]
    encoded = _one_turn(template, tokenizer, columns["_prompt"], answers, columns["_system"], columns["_tools"])
    rows = []
    for (prompt, answer), tag in zip(encoded, tags):
        answer = _efficient_eos(template, tokenizer, answer)
        source_len, target_len = infer_seqlen(len(prompt), len(answer), cutoff_len)
        prompt, answer = prompt[:source_len], answer[:target_len]
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer, "kto_tags": tag})
    return rows


def is_valid_pairwise(example: dict) -> bool:
    prompt, response = example["_prompt"], example["_response"]
    return (
        len(prompt) % 2 == 1 and len(response) == 2 and bool(response[0]["content"]) and bool(response[1]["content"])
    )


def is_valid_feedback(example: dict) -> bool:
    """A kto record: exactly one side holds the answer (the side says whether it is desirable)."""
    prompt, response = example["_prompt"], example["_response"]
    return len(prompt) % 2 == 1 and len(response) == 2 and bool(response[0]["content"]) != bool(response[1]["content"])


def _aligned(batch: dict, attr, is_valid) -> tuple[int, dict, list[int]]:
    """Raw records aligned; the columns of the valid ones and their positions in the batch."""
    n = len(next(iter(batch.values())))
    aligned = [convert({k: v[i] for k, v in batch.items()}, attr) for i in range(n)]
    keep = [i for i, a in enumerate(aligned) if is_valid(a)]
    return n, {k: [aligned[i][k] for i in keep] for k in ("_prompt", "_response", "_system", "_tools")}, keep


def encode_pairwise_records(batch: dict, attr, template: Template, tokenizer, data_args):
    """Raw ranking records → chosen/rejected rows, one per record; invalid ones come out empty, `_valid` False."""
    n, columns, keep = _aligned(batch, attr, is_valid_pairwise)
    encoded = dict(zip(keep, encode_pairwise(columns, template, tokenizer, data_args.cutoff_len)))
    empty = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
    rows = [encoded.get(i, empty) for i in range(n)]
    valid = [
        i in encoded and _learnable(rows[i]["chosen_labels"]) and _learnable(rows[i]["rejected_labels"])
        for i in range(n)
    ]
    chosen = as_arrow_table([r["chosen_input_ids"] for r in rows], [r["chosen_labels"] for r in rows], valid)
    rejected = as_arrow_table([r["rejected_input_ids"] for r in rows], [r["rejected_labels"] for r in rows], valid)
    out = {f"chosen_{k}": chosen[k] for k in ("input_ids", "attention_mask", "labels")}
    out.update({f"rejected_{k}": rejected[k] for k in ("input_ids", "attention_mask", "labels")})
    out["_valid"] = chosen["_valid"]
    return pa.table(out)


def encode_feedback_records(batch: dict, attr, template: Template, tokenizer, data_args):
    """Raw kto records → rows with `kto_tags`, one per record; invalid ones come out empty, `_valid` False."""
    n, columns, keep = _aligned(batch, attr, is_valid_feedback)
    encoded = dict(zip(keep, encode_feedback(columns, template, tokenizer, data_args.cutoff_len)))
    empty = {"input_ids": [], "labels": [], "kto_tags": False}
    rows = [encoded.get(i, empty) for i in range(n)]
    valid = [i in encoded and _learnable(rows[i]["labels"]) for i in range(n)]
    table = as_arrow_table([r["input_ids"] for r in rows], [r["labels"] for r in rows], valid)
    return table.append_column("kto_tags", pa.array([r["kto_tags"] for r in rows]))


def _learnable(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels)
