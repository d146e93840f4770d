"""Data kinds: how the records of a stage become training rows, and how those rows pack and collate.

A stage names its kind (`lf_dist/train/stages.py`); data/ only ever sees the kind, never a stage name.

- text: plain texts (pt) → input_ids = labels; packing joins texts and cuts cutoff_len blocks.
- supervised: prompt / answer turns → input_ids, labels with the prompt masked; packs examples into rows.
- pairwise: prompt, chosen, rejected → chosen_* / rejected_* columns; packs whole pairs into 2 × cutoff_len.
- feedback: prompt, answer and whether it is desirable → input_ids, labels, kto_tags; does not pack.
- prompt: the prompt a model answers by generating (left-padded input_ids) and the dataset's reference answer as
  text; does not pack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lf_dist.data.collator import Collator, FeedbackCollator, PairwiseCollator
from lf_dist.data.packing import pack_dataset, pack_pairs
from lf_dist.data.preference import encode_feedback_records, encode_pairwise_records
from lf_dist.data.prompts import PromptCollator, encode_prompt_records
from lf_dist.data.tokenize import encode_supervised_records


@dataclass(frozen=True)
class DataKind:
    name: str
    # datasets.map function (batch, attr, template, tokenizer, data_args) → one row per record with `_valid`;
    # None for text, which is tokenized after the split (texts are joined into blocks there).
    encode: Callable | None
    # (dataset, cutoff_len) → packed dataset; None when this kind's rows do not pack (or pack while encoding).
    pack: Callable | None
    # (pad_token_id, cutoff_len, separate, padding_free) → the collate function of a batch of rows; `separate`:
    # the examples of a packed row are kept apart (neat packing); `padding_free`: unpacked rows go end to end.
    collator: Callable[[int, int, bool, bool], Callable]
    # Whether `packing` means anything for this kind.
    packs: bool
    # Sequences per example that go through the model with gradients (chosen and rejected for pairs).
    sequences: int = 1
    # Whether its datasets are registered with "ranking": true (chosen / rejected answers), as LLaMA-Factory asks.
    ranking: bool = False

    def make_collator(self, tokenizer, cutoff_len: int, separate: bool = False, padding_free: bool = False):
        return self.collator(tokenizer.pad_token_id, cutoff_len, separate, padding_free)


def _plain(pad_token_id: int, cutoff_len: int, separate: bool, padding_free: bool) -> Collator:
    return Collator(pad_token_id, separate, padding_free)


def _pairs(pad_token_id: int, cutoff_len: int, separate: bool, padding_free: bool) -> PairwiseCollator:
    return PairwiseCollator(pad_token_id, padding_free)  # packed pairs are always kept apart


def _feedback(pad_token_id: int, cutoff_len: int, separate: bool, padding_free: bool) -> FeedbackCollator:
    return FeedbackCollator(pad_token_id, cutoff_len, padding_free)


def _prompts(pad_token_id: int, cutoff_len: int, separate: bool, padding_free: bool) -> PromptCollator:
    return PromptCollator(pad_token_id)


TEXT = DataKind("text", encode=None, pack=None, collator=_plain, packs=True)
SUPERVISED = DataKind("supervised", encode=encode_supervised_records, pack=pack_dataset, collator=_plain, packs=True)
PAIRWISE = DataKind(
    "pairwise", encode=encode_pairwise_records, pack=pack_pairs, collator=_pairs, packs=True, sequences=2, ranking=True
)
FEEDBACK = DataKind("feedback", encode=encode_feedback_records, pack=None, collator=_feedback, packs=False)
PROMPT = DataKind("prompt", encode=encode_prompt_records, pack=None, collator=_prompts, packs=False)


def row_layout(kind_or_columns) -> str:
    """The layout of saved rows (what a tokenized_path holds): text and supervised rows share one."""
    if isinstance(kind_or_columns, DataKind):
        return "supervised" if kind_or_columns is TEXT else kind_or_columns.name
    columns = set(kind_or_columns)
    if "kto_tags" in columns:
        return "feedback"
    if "answer" in columns:
        return "prompt"
    return "pairwise" if {"chosen_input_ids", "seq_lens"} & columns else "supervised"
