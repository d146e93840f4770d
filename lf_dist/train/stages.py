"""Stage losses. A stage knows how to turn a batch into a summed loss; it knows nothing of backends.

Losses are returned as *sums* over label tokens; the loop divides by the number of label tokens in the whole
optimizer step (all micro-batches, all ranks), so batch layout never changes the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lf_dist.data.tokenize import IGNORE_INDEX


def model_inputs(batch: dict, neat_packing: bool) -> dict:
    """What the model sees. Neat-packed rows go without an attention mask: transformers then builds a
    block-diagonal mask from the restarting position_ids (varlen kernels with flash-attention)."""
    keys = (
        ("input_ids", "position_ids")
        if neat_packing and "position_ids" in batch
        else ("input_ids", "attention_mask", "position_ids")
    )
    return {k: batch[k] for k in keys if k in batch}


class CausalLMStage:
    """pt and sft: next-token cross-entropy on the label tokens."""

    def __init__(self, name: str, neat_packing: bool = False):
        self.name = name
        self.neat_packing = neat_packing

    @staticmethod
    def num_tokens(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def num_input_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(**model_inputs(batch, self.neat_packing), use_cache=False).logits
        shift_logits = logits[:, :-1, :].float()
        shift_labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, {}


def build_stage(cfg) -> CausalLMStage:
    name = cfg.finetuning.stage
    if name in ("pt", "sft"):
        return CausalLMStage(name, neat_packing=cfg.data.neat_packing)
    raise ValueError(f"no loss for stage {name}")
