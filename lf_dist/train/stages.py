"""Stage losses. A stage knows how to turn a batch into a summed loss; it knows nothing of backends.

Losses are returned as *sums* over label tokens; the loop divides by the number of label tokens in the whole
optimizer step (all micro-batches, all ranks), so batch layout never changes the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lf_dist.data.tokenize import IGNORE_INDEX


class CausalLMStage:
    """pt and sft: next-token cross-entropy on the label tokens."""

    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def num_tokens(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def num_input_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False).logits
        shift_logits = logits[:, :-1, :].float()
        shift_labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, {}


def build_stage(name: str) -> CausalLMStage:
    if name in ("pt", "sft"):
        return CausalLMStage(name)
    raise ValueError(f"no loss for stage {name}")
