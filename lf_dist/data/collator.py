"""Batch tokenized rows: right-pad to the longest row, labels padded with IGNORE_INDEX.

Packed rows also carry `position_ids`. Their padding gets positions 0, 1, 2, ... so that, fed without an
attention mask (neat packing), the padding forms a block of its own and never mixes into a real example.
"""

from __future__ import annotations

import torch

from lf_dist.data.tokenize import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        packed = "position_ids" in rows[0]
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        position_ids = torch.arange(length).repeat(len(rows), 1) if packed else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
            if packed:
                position_ids[i, :n] = torch.as_tensor(row["position_ids"])
                position_ids[i, n:] = torch.arange(length - n)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if packed:
            batch["position_ids"] = position_ids
        return batch


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _sequences(ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict:
    """One sequence per row: ids, mask, labels, `seq_ids` (the row, -1 on padding), `ends` (flat last index)."""
    length = max(len(r) for r in ids)
    lengths = torch.tensor([len(r) for r in ids])
    seq_ids = torch.where(torch.arange(length) < lengths[:, None], torch.arange(len(ids))[:, None], -1)
    return {
        "input_ids": _pad(ids, pad_token_id, length),
        "attention_mask": (seq_ids >= 0).long(),
        "labels": _pad(labels, IGNORE_INDEX, length),
        "seq_ids": seq_ids,
        "ends": torch.arange(len(ids)) * length + lengths - 1,
    }


class PairwiseCollator:
    """Pairs (ranking data), chosen and rejected in one batch for one concatenated forward.

    Sequence k is the chosen answer of pair k and sequence P + k its rejected answer (P pairs), whether rows
    hold one sequence (rows: chosen_1..P, rejected_1..P, as TRL concatenates) or packed pairs (`seq_lens`).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "seq_lens" in rows[0]:
            return self._packed(rows)
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return _sequences(ids, labels, self.pad_token_id)

    def _packed(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        n_pairs = sum(len(r["seq_lens"]) for r in rows) // 2
        seq_ids = torch.full((len(rows), length), -1, dtype=torch.long)
        position_ids = torch.arange(length).repeat(len(rows), 1)
        ends = torch.zeros(2 * n_pairs, dtype=torch.long)
        pair = 0
        for i, row in enumerate(rows):
            start = 0
            for j, n in enumerate(row["seq_lens"]):
                seq = pair + (j // 2) + (n_pairs if j % 2 else 0)
                seq_ids[i, start : start + n] = seq
                ends[seq] = i * length + start + n - 1
                start += n
            position_ids[i, :start] = torch.as_tensor(row["position_ids"])
            position_ids[i, start:] = torch.arange(length - start)  # padding: a block of its own
            pair += len(row["seq_lens"]) // 2
        return {
            "input_ids": _pad([r["input_ids"] for r in rows], self.pad_token_id, length),
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, length),
            "position_ids": position_ids,
            "seq_ids": seq_ids,
            "ends": ends,
        }


class FeedbackCollator:
    """Feedback rows (answers tagged desirable or not), plus the mismatched rows of KTO's KL estimate: prompt i
    with the answer of row i-1 (TRL's rule)."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows]
        batch = _sequences(ids, labels, self.pad_token_id)
        batch["kto_tags"] = torch.tensor([bool(r["kto_tags"]) for r in rows])
        split = [next(i for i, x in enumerate(lab) if x != IGNORE_INDEX) for lab in labels]
        prompts = [row[:s] for row, s in zip(ids, split)]
        answers = [row[s:] for row, s in zip(ids, split)]
        answers = answers[-1:] + answers[:-1]
        kl_ids = [(p + a)[: self.max_length] for p, a in zip(prompts, answers)]
        kl_labels = [([IGNORE_INDEX] * len(p) + a)[: self.max_length] for p, a in zip(prompts, answers)]
        kl = _sequences(kl_ids, kl_labels, self.pad_token_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch
