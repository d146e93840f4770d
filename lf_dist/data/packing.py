"""Sequence packing: tokenized examples into cutoff_len rows, position_ids restarting per example.

Bins are filled best-fit decreasing. Packed rows carry `position_ids`; whether examples in a row may attend to
each other is decided at run time (`neat_packing`): neat rows are fed without an attention mask, so
transformers derives a block-diagonal mask from the restarting positions (varlen kernels on flash-attention).
"""

from __future__ import annotations

import bisect


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity; each item goes to the fullest bin it fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
        else:
            remaining, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (remaining - need, b))
    return bins


def _gather(batch: dict, source) -> dict:
    out = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for members in batch["members"]:
        rows = source[members]
        ids = [t for r in rows["input_ids"] for t in r]
        out["input_ids"].append(ids)
        out["labels"].append([t for r in rows["labels"] for t in r])
        out["position_ids"].append([p for r in rows["input_ids"] for p in range(len(r))])
        out["attention_mask"].append([1] * len(ids))
    return out


def pack_dataset(ds, cutoff_len: int):
    """A new dataset of packed rows (input_ids, labels, position_ids, attention_mask)."""
    import datasets

    lengths = [len(x) for x in ds["input_ids"]]
    bins = best_fit_decreasing(lengths, cutoff_len)
    index = datasets.Dataset.from_dict({"members": bins})
    return index.map(
        _gather, fn_kwargs={"source": ds}, batched=True, remove_columns=["members"], desc="Packing sequences"
    )


def _gather_pairs(batch: dict, source) -> dict:
    out = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for members in batch["members"]:
        rows = source[members]
        ids, labels, positions, lens = [], [], [], []
        for k in range(len(members)):  # chosen then rejected, pair after pair: a pair never spans two rows
            for side in ("chosen", "rejected"):
                seq = rows[f"{side}_input_ids"][k]
                ids += seq
                labels += rows[f"{side}_labels"][k]
                positions += range(len(seq))
                lens.append(len(seq))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["seq_lens"].append(lens)
    return out


def pack_pairs(ds, cutoff_len: int):
    """Preference pairs packed whole into rows of 2 x cutoff_len tokens (the most one pair can take).

    Rows carry `seq_lens` (chosen, rejected, chosen, ...) and restarting `position_ids`; they are always fed
    without an attention mask, so no sequence attends to another.
    """
    import datasets

    lengths = [len(c) + len(r) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"])]
    bins = best_fit_decreasing(lengths, 2 * cutoff_len)
    index = datasets.Dataset.from_dict({"members": bins})
    return index.map(
        _gather_pairs, fn_kwargs={"source": ds}, batched=True, remove_columns=["members"], desc="Packing pairs"
    )
