"""Batch tokenized rows, in one of three layouts (what the model is fed is `train/losses.py:model_inputs`):

- padded: rows right-padded to the longest, labels padded with IGNORE_INDEX, an attention mask of the real
  tokens. Causal attention never lets a real token see the padding after it.
- packed: rows that already hold several examples (`packing`), with position_ids restarting per example. Their
  padding gets positions 0, 1, 2, ... so that it forms a segment of its own.
- padding-free: the examples of a micro-batch laid end to end in one row, position_ids restarting, no padding.

Rows whose examples must not see each other (neat packing, packed pairs, padding-free) carry `cu_seq_lens`
(where each segment starts, over the flattened rows) and `max_seq_len`: varlen attention reads them, and the
first token of each example gets no label, as in its own padded row (no example predicts another's token).
"""

from __future__ import annotations

import torch

from lf_dist.data.tokenize import IGNORE_INDEX


def segments(position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """`cu_seq_lens` (int32 [n + 1]) and `max_seq_len` of rows whose segments start where position_ids is 0."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(-1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return {"cu_seq_lens": cu, "max_seq_len": (cu[1:] - cu[:-1]).max()}


def _separate(batch: dict) -> dict:
    """Mark segment boundaries; a segment's first token is predicted by no one."""
    batch.update(segments(batch["position_ids"]))
    batch["labels"] = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
    return batch


def _end_to_end(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row [1, Σ len] of all rows, and its restarting position_ids."""
    ids = torch.as_tensor([t for r in rows for t in r], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    return ids, positions


class Collator:
    """Rows of input_ids and labels (text, supervised). `separate`: the examples of a packed row are kept apart
    (neat packing); `padding_free`: unpacked rows go end to end in one row."""

    def __init__(self, pad_token_id: int, separate: bool = False, padding_free: bool = False):
        self.pad_token_id, self.separate, self.padding_free = pad_token_id, separate, padding_free

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.padding_free and "position_ids" not in rows[0]:
            ids, positions = _end_to_end([r["input_ids"] for r in rows])
            labels = torch.as_tensor([t for r in rows for t in r["labels"]], dtype=torch.long)[None]
            return _separate({"input_ids": ids, "labels": labels, "position_ids": positions})
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
            if self.separate:
                _separate(batch)
        return batch


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _sequences(ids: list[list[int]], labels: list[list[int]], pad_token_id: int, padding_free: bool) -> dict:
    """One sequence per row (or all end to end in one row): ids, labels, `seq_ids` (the sequence, -1 on
    padding), `ends` (flat index of each sequence's last token)."""
    lengths = torch.tensor([len(r) for r in ids])
    if padding_free:
        input_ids, positions = _end_to_end(ids)
        batch = {
            "input_ids": input_ids,
            "labels": torch.as_tensor([t for r in labels for t in r], dtype=torch.long)[None],
            "position_ids": positions,
            "seq_ids": torch.repeat_interleave(torch.arange(len(ids)), lengths)[None],
            "ends": lengths.cumsum(0) - 1,
        }
        return _separate(batch)
    length = int(lengths.max())
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

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        self.pad_token_id, self.padding_free = pad_token_id, padding_free

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "seq_lens" in rows[0]:
            return self._packed(rows)
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return _sequences(ids, labels, self.pad_token_id, self.padding_free)

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
        batch = {
            "input_ids": _pad([r["input_ids"] for r in rows], self.pad_token_id, length),
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, length),
            "position_ids": position_ids,
            "seq_ids": seq_ids,
            "ends": ends,
        }
        return _separate(batch)


class FeedbackCollator:
    """Feedback rows (answers tagged desirable or not), plus the mismatched rows of KTO's KL estimate: prompt i
    with the answer of row i-1 (TRL's rule)."""

    def __init__(self, pad_token_id: int, max_length: int, padding_free: bool = False):
        self.pad_token_id, self.max_length, self.padding_free = pad_token_id, max_length, padding_free

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows]
        batch = _sequences(ids, labels, self.pad_token_id, self.padding_free)
        batch["kto_tags"] = torch.tensor([bool(r["kto_tags"]) for r in rows])
        split = [next(i for i, x in enumerate(lab) if x != IGNORE_INDEX) for lab in labels]
        prompts = [row[:s] for row, s in zip(ids, split)]
        answers = [row[s:] for row, s in zip(ids, split)]
        answers = answers[-1:] + answers[:-1]
        kl_ids = [(p + a)[: self.max_length] for p, a in zip(prompts, answers)]
        kl_labels = [([IGNORE_INDEX] * len(p) + a)[: self.max_length] for p, a in zip(prompts, answers)]
        kl = _sequences(kl_ids, kl_labels, self.pad_token_id, self.padding_free)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch
