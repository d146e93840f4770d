"""Stage losses. A stage knows how to turn a batch into a summed loss; it knows nothing of backends.

Losses are returned as *sums* over the stage's units — label tokens for pt/sft, pairs for rm/dpo, examples for
kto; the loop divides by the number of units in the whole optimizer step (all micro-batches, all ranks), so
batch layout never changes the gradient. Metrics come back as (sum, count) tensors and are logged as means.
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


class Stage:
    """What the loop needs from a stage."""

    name = "base"

    @staticmethod
    def num_units(batch: dict) -> int:
        """What the loss is summed over (the step's loss is divided by the global count)."""
        raise NotImplementedError

    @staticmethod
    def num_input_tokens(batch: dict) -> int:
        """Real (non-padding) tokens the model reads, for throughput."""
        if "seq_ids" in batch:
            return int((batch["seq_ids"] >= 0).sum())
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def summarize_metrics(sums: dict) -> dict:
    """Means from reduced (sum, count) pairs; metrics without any count this window are left out."""
    out = {k: float(v[0] / v[1]) for k, v in sums.items() if float(v[1]) > 0}
    if "rewards/margins" not in sums and "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]  # unpaired (kto), as TRL logs it
    return {k: round(v, 6) for k, v in out.items()}


class CausalLMStage(Stage):
    """pt and sft: next-token cross-entropy on the label tokens."""

    def __init__(self, name: str, neat_packing: bool = False):
        self.name = name
        self.neat_packing = neat_packing

    @staticmethod
    def num_units(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

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


def build_stage(cfg, reference=None) -> Stage:
    """The stage's loss; `reference` (a `preference.Reference`) serves dpo's reference losses and kto."""
    from lf_dist.train import preference

    f, name = cfg.finetuning, cfg.finetuning.stage
    if name in ("pt", "sft"):
        return CausalLMStage(name, neat_packing=cfg.data.neat_packing)
    if name == "dpo":
        return preference.DPOStage(
            f.pref_loss, f.pref_beta, f.pref_ftx, f.dpo_label_smoothing, f.simpo_gamma, reference
        )
    if name == "kto":
        return preference.KTOStage(f.pref_beta, f.pref_ftx, f.kto_chosen_weight, f.kto_rejected_weight, reference)
    if name == "rm":
        return preference.RewardStage()
    raise ValueError(f"no loss for stage {name}")


def needs_reference(cfg) -> bool:
    from lf_dist.train.pref_losses import REFERENCE_LOSSES

    f = cfg.finetuning
    return f.stage == "kto" or (f.stage == "dpo" and f.pref_loss in REFERENCE_LOSSES)
