"""Preference stages: dpo (sigmoid, hinge, ipo, orpo, simpo), kto and rm, on the loop every stage shares.

Each stage returns the *sum* of its per-pair (per-example for kto) losses; the loop divides by the number of
pairs in the whole optimizer step, so accumulation and data parallelism leave the update unchanged. Metrics
are (sum, count) pairs, reduced over micro-batches and ranks by the loop, then logged as means.

Chosen and rejected answers go through the model in one forward (`PairwiseCollator` puts them in one batch,
or packs pairs into shared rows that are fed without an attention mask, so no sequence sees another).
"""

from __future__ import annotations

import torch

from lf_dist.train.losses import StageLoss, metric, model_inputs
from lf_dist.train.pref_losses import (
    REFERENCE_LOSSES,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    reference_loss,
    simpo_loss,
)
from lf_dist.train.token_logps import sequence_logps


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    n = chosen_rewards.numel()
    return {
        "rewards/chosen": metric(chosen_rewards, n),
        "rewards/rejected": metric(rejected_rewards, n),
        "rewards/accuracies": metric((chosen_rewards > rejected_rewards).float(), n),
        "rewards/margins": metric(chosen_rewards - rejected_rewards, n),
        "logps/chosen": metric(chosen_logps, n),
        "logps/rejected": metric(rejected_logps, n),
    }


class PairwiseLoss(StageLoss):
    @staticmethod
    def num_units(batch: dict) -> int:
        return batch["ends"].numel() // 2


class DPOLoss(PairwiseLoss):
    """dpo with `pref_loss` sigmoid / hinge / ipo (against a reference) or orpo / simpo (reference-free);
    `ref` is the reference (a `Frozen`), None for the reference-free losses."""

    def __init__(self, loss_type: str, beta: float, ftx: float, label_smoothing: float, simpo_gamma: float, ref):
        self.loss_type, self.beta, self.ftx = loss_type, beta, ftx
        self.label_smoothing, self.simpo_gamma, self.reference = label_smoothing, simpo_gamma, ref

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n = batch["ends"].numel()
        inputs = model_inputs(batch)
        logps, lens = sequence_logps(model, inputs, batch["labels"], batch["seq_ids"], n)
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lens.chunk(2)
        chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        extra = {}
        if self.loss_type in REFERENCE_LOSSES:
            ref = self.reference.logps(model, inputs, batch["labels"], batch["seq_ids"], n)
            ref_chosen, ref_rejected = ref.chunk(2)
            losses, chosen_rewards, rejected_rewards = reference_loss(
                self.loss_type,
                self.beta,
                self.label_smoothing,
                chosen,
                rejected,
                ref_chosen,
                ref_rejected,
                chosen_len,
                rejected_len,
            )
            logged = (chosen, rejected)  # summed log-probs, as TRL's DPO logs them
        else:
            if self.loss_type == "orpo":
                losses, chosen_rewards, rejected_rewards, odds = orpo_loss(self.beta, chosen_avg, rejected_avg)
                extra["odds_ratio_loss"] = metric(odds, odds.numel())
            else:
                losses, chosen_rewards, rejected_rewards = simpo_loss(
                    self.beta, self.simpo_gamma, self.label_smoothing, chosen_avg, rejected_avg
                )
            logged = (chosen_avg, rejected_avg)  # mean log-probs, the quantity these losses use
        if self.ftx > 0:
            losses = losses + self.ftx * -chosen_avg
        metrics = pair_metrics(chosen_rewards, rejected_rewards, *logged)
        metrics["sft_loss"] = metric(-chosen_avg, chosen_avg.numel())
        return losses.sum(), {**metrics, **extra}


class KTOLoss(StageLoss):
    """KTO on single answers tagged desirable or not; the KL term comes from mismatched rows of the batch."""

    def __init__(self, beta: float, ftx: float, desirable_weight: float, undesirable_weight: float, ref):
        self.beta, self.ftx, self.reference = beta, ftx, ref
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    @staticmethod
    def num_units(batch: dict) -> int:
        return batch["ends"].numel()  # examples, whether padded rows or end to end in one row

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n, tags = batch["ends"].numel(), batch["kto_tags"]
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        kl_inputs = model_inputs(kl_batch)
        with torch.no_grad():
            kl_logps = sequence_logps(model, kl_inputs, kl_batch["labels"], kl_batch["seq_ids"], n)[0]
        inputs = model_inputs(batch)
        logps, lens = sequence_logps(model, inputs, batch["labels"], batch["seq_ids"], n)
        ref_logps = self.reference.logps(model, inputs, batch["labels"], batch["seq_ids"], n)
        ref_kl = self.reference.logps(model, kl_inputs, kl_batch["labels"], kl_batch["seq_ids"], n)
        kl = (kl_logps - ref_kl).mean().clamp(min=0).detach()
        losses, rewards = kto_loss(
            self.beta, self.desirable_weight, self.undesirable_weight, logps, ref_logps, tags, kl
        )
        if self.ftx > 0:
            losses = losses + self.ftx * torch.where(tags, -logps / lens.clamp(min=1), 0.0)
        chosen, rejected = tags.float(), (~tags).float()
        metrics = {
            "rewards/chosen": metric(rewards * chosen, chosen.sum()),
            "rewards/rejected": metric(rewards * rejected, rejected.sum()),
            # desirable answers made likelier than under the reference, undesirable ones less likely
            "rewards/accuracies": metric(torch.where(tags, rewards > 0, rewards < 0).float(), n),
            "logps/chosen": metric(logps * chosen, chosen.sum()),
            "logps/rejected": metric(logps * rejected, rejected.sum()),
            "kl": metric(kl, 1),
        }
        return losses.sum(), metrics

    def means(self, sums: dict) -> dict:
        out = super().means(sums)
        if "rewards/chosen" in out and "rewards/rejected" in out:  # unpaired answers: margins as TRL logs them
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


class RewardLoss(PairwiseLoss):
    """rm: a sequence-classification head scores each sequence at its last token; Bradley-Terry pair loss."""

    def __init__(self):
        self._head = {}

    def _score_head(self, model) -> torch.nn.Module:
        """The `score` layer (peft's wrapper around it for LoRA); its output is captured per token, which also
        serves packed rows, where the model's own last-token pooling would see one sequence per row."""
        key = id(model)
        if key not in self._head:
            named = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] == "score"]
            if not named:
                raise RuntimeError("stage rm: the model has no `score` head")
            self._head[key] = min(named, key=lambda x: len(x[0]))[1]
        return self._head[key]

    def scores(self, model, batch: dict) -> torch.Tensor:
        captured = []
        handle = self._score_head(model).register_forward_hook(lambda mod, args, out: captured.append(out))
        try:
            model(**model_inputs(batch), use_cache=False)
        finally:
            handle.remove()
        return captured[-1].squeeze(-1).reshape(-1)[batch["ends"]]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = self.scores(model, batch).float().chunk(2)
        losses = pairwise_reward_loss(chosen, rejected)
        n = chosen.numel()
        return losses.sum(), {
            "rewards/chosen": metric(chosen, n),
            "rewards/rejected": metric(rejected, n),
            "rewards/accuracies": metric((chosen > rejected).float(), n),
            "rewards/margins": metric(chosen - rejected, n),
        }
