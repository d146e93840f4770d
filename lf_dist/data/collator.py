"""Batch tokenized rows: right-pad to the longest row, labels padded with IGNORE_INDEX.

Packed rows also carry `position_ids`. Their padding gets positions 0, 1, 2, ... so that, fed without an
attention mask (neat packing), the padding forms a block of its own and never mixes into a real example.
"""

from __future__ import annotations

import torch

from lf_dist.data.tokenize import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.multiple) * self.multiple
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
