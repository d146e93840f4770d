"""Preference stages: dpo (sigmoid, hinge, ipo, orpo, simpo), kto and rm, on the loop every stage shares.

Each stage returns the *sum* of its per-pair (per-example for kto) losses; the loop divides by the number of
pairs in the whole optimizer step, so accumulation and data parallelism leave the update unchanged. Metrics
are (sum, count) pairs, reduced over micro-batches and ranks by the loop, then logged as means.

The reference model's log-probs are batch columns (`ref_logps`, and kto's `ref_kl_logps`) that the stage's
`prepare` hook (`reference_columns`) computes before the step, without gradients, through the strategy; a batch
without them (a direct call) has them computed in `forward`.

Chosen and rejected answers go through the model in one forward (`PairwiseCollator` puts them in one batch,
or packs pairs into shared rows that are fed without an attention mask, so no sequence sees another).
"""

from __future__ import annotations

import torch

from lf_dist.train.losses import StageLoss, StepContext, metric, model_inputs
from lf_dist.train.pref_losses import (
    REFERENCE_LOSSES,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    reference_loss,
    simpo_loss,
)
from lf_dist.train.token_logps import _forward_as, causal_lm, sequence_logps


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


def _sequence_logps(model, batch: dict, prefix: str = ""):
    """Summed label log-probs and label counts of each sequence of `batch` (its `prefix`ed columns)."""
    return sequence_logps(
        model,
        model_inputs({k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}),
        batch[prefix + "labels"],
        batch[prefix + "seq_ids"],
        batch["ends"].numel(),
    )


def reference_columns(ctx: StepContext, batches: list[dict]) -> list[list[dict]]:
    """`prepare` of the stages with a reference model: its log-probs of every micro-batch as columns, computed
    before the step through the strategy's `forward_only` (nothing for the reference-free losses)."""
    if ctx.loss.reference is None:
        return [batches]
    for batch in batches:
        batch.update(ctx.strategy.forward_only(ctx.model, batch, ctx.loss.reference_logps))
    return [batches]


class DPOLoss(PairwiseLoss):
    """dpo with `pref_loss` sigmoid / hinge / ipo (against a reference) or orpo / simpo (reference-free);
    `ref` is the reference (a `Frozen`), None for the reference-free losses."""

    def __init__(self, loss_type: str, beta: float, ftx: float, label_smoothing: float, simpo_gamma: float, ref):
        self.loss_type, self.beta, self.ftx = loss_type, beta, ftx
        self.label_smoothing, self.simpo_gamma, self.reference = label_smoothing, simpo_gamma, ref

    def reference_logps(self, model, batch: dict) -> dict:
        """The reference's columns of `batch` (none for the reference-free losses)."""
        if self.loss_type not in REFERENCE_LOSSES:
            return {}
        with self.reference.use(model) as ref:
            return {"ref_logps": _sequence_logps(ref, batch)[0].detach()}

    def forward(self, model, batch: dict) -> dict:
        logps, lens = _sequence_logps(model, batch)
        prepared = {k: batch[k] for k in ("ref_logps",) if k in batch}
        return {"logps": logps, "lens": lens, **(prepared or _no_grad(self.reference_logps, model, batch))}

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        logps, lens = outputs["logps"], outputs["lens"]
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lens.chunk(2)
        chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        extra = {}
        if self.loss_type in REFERENCE_LOSSES:
            ref_chosen, ref_rejected = outputs["ref_logps"].chunk(2)
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

    def reference_logps(self, model, batch: dict) -> dict:
        """The reference's log-probs of the answers and of the mismatched (KL) rows."""
        with self.reference.use(model) as ref:
            return {
                "ref_logps": _sequence_logps(ref, batch)[0].detach(),
                "ref_kl_logps": _sequence_logps(ref, batch, "kl_")[0].detach(),
            }

    def forward(self, model, batch: dict) -> dict:
        with torch.no_grad():
            kl_logps = _sequence_logps(model, batch, "kl_")[0]
        logps, lens = _sequence_logps(model, batch)
        prepared = {k: batch[k] for k in ("ref_logps", "ref_kl_logps") if k in batch}
        reference = prepared or _no_grad(self.reference_logps, model, batch)
        return {"kl_logps": kl_logps, "logps": logps, "lens": lens, **reference}

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        n, tags = batch["ends"].numel(), batch["kto_tags"]
        logps, lens, ref_logps = outputs["logps"], outputs["lens"], outputs["ref_logps"]
        kl = (outputs["kl_logps"] - outputs["ref_kl_logps"]).mean().clamp(min=0).detach()
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

    def forward(self, model, batch: dict) -> torch.Tensor:
        return self.scores(model, batch)

    def scores(self, model, batch: dict) -> torch.Tensor:
        """The score of each sequence at its last token (`ends`). For this call the classifier's forward returns
        the `score` layer's output at every token, so that it is the model's own output: wrappers that act on
        the outputs of the call (FSDP2 unshards the root's weights for backward from them) see it."""
        inner, head = causal_lm(model), self._score_head(model)
        decoder = getattr(inner, inner.base_model_prefix)

        def per_token(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "labels"}
            return head(decoder(*args, **kwargs).last_hidden_state)

        with _forward_as(inner, per_token):
            out = model(**model_inputs(batch), use_cache=False)
        return out.squeeze(-1).reshape(-1)[batch["ends"]]

    def loss(self, outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = outputs.float().chunk(2)
        losses = pairwise_reward_loss(chosen, rejected)
        n = chosen.numel()
        return losses.sum(), {
            "rewards/chosen": metric(chosen, n),
            "rewards/rejected": metric(rejected, n),
            "rewards/accuracies": metric((chosen > rejected).float(), n),
            "rewards/margins": metric(chosen - rejected, n),
        }


@torch.no_grad()
def _no_grad(fn, *args):
    return fn(*args)
