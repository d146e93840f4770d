"""Preference losses as pure functions of per-sequence log-probs: one value per pair (or example), no reduction.

The formulas are TRL's (the parity tests compute TRL's numbers in the same run), with LLaMA-Factory's meaning
of its keys: `dpo_label_smoothing` is conservative DPO (cDPO) on the sigmoid loss, as it was in the TRL that
LLaMA-Factory builds on; `pref_ftx` adds the chosen answer's mean token NLL per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_LOSSES = ("sigmoid", "hinge", "ipo")  # need a reference model
REFERENCE_FREE_LOSSES = ("orpo", "simpo")


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def reference_loss(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-style losses against a reference; returns (loss per pair, chosen rewards, rejected rewards)."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # length-normalized, as TRL (and LLaMA-Factory) compute it
        avg_delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        losses = (avg_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"not a reference loss: {loss_type}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(beta: float, chosen_avg: torch.Tensor, rejected_avg: torch.Tensor):
    """ORPO on mean token log-probs: NLL of the chosen answer + beta * odds-ratio loss.
    Returns (loss per pair, chosen rewards, rejected rewards, odds-ratio term per pair)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    odds_ratio = -F.logsigmoid(log_odds)
    losses = -chosen_avg + beta * odds_ratio
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach(), odds_ratio.detach()


def simpo_loss(
    beta: float, gamma: float, label_smoothing: float, chosen_avg: torch.Tensor, rejected_avg: torch.Tensor
):
    """SimPO: a length-normalized margin with target reward margin gamma, no reference."""
    logits = (chosen_avg - rejected_avg) - gamma / beta
    losses = _smoothed_sigmoid(beta * logits, label_smoothing)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_loss(
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    tags: torch.Tensor,
    kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO per example (tags True = desirable) given the batch's KL estimate; returns (loss, reward)."""
    ratio = logps - ref_logps
    chosen = 1 - torch.sigmoid(beta * (ratio - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(tags, desirable_weight * chosen, undesirable_weight * rejected)
    return losses, beta * ratio.detach()


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a reward model, per pair."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())
