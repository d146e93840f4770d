"""sft's token losses besides cross-entropy, as LLaMA-Factory implements them (train/trainer_utils.py there).

- DFT (`use_dft_loss`, Dynamic Fine-Tuning): each label token's cross-entropy weighted by its probability, the
  weight detached: -p·log p.
- EAFT (`use_eaft_loss`, entropy-adaptive): the cross-entropy weighted by (H_top20 / 3)^eaft_alpha, where H_top20
  is the entropy of the distribution renormalised over the 20 largest logits, detached.
- ASFT (`use_asft_loss`, anchored): DFT plus asft_alpha times KL(reference ‖ policy) over the vocabulary, at the
  same positions; the reference is a frozen model (LoRA: the base with adapters off).

The formulas are pure functions of per-token tensors (`*_token_loss`); the loss classes sum them over the label
tokens, and the loop divides by the step's global count of label tokens — on one micro-batch, exactly
LLaMA-Factory's mean over the valid tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lf_dist.train.losses import CausalLMLoss, metric, model_inputs
from lf_dist.train.token_logps import scored_logits

EAFT_TOP_K = 20  # LLaMA-Factory's: the entropy is taken over the 20 largest logits
EAFT_ENTROPY_SCALE = 3.0  # and divided by 3 before the power


def dft_token_loss(logps: torch.Tensor) -> torch.Tensor:
    """-p·log p per token from the label tokens' log-probs [N]; p is a weight (no gradient through it)."""
    return -logps * logps.detach().exp()


def eaft_token_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Cross-entropy [N] of `targets` under `logits` [N, V], weighted by (top-20 entropy / 3)^alpha (detached)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():
        top = torch.topk(logits, k=min(EAFT_TOP_K, logits.shape[-1]), dim=-1).values
        log_p = top - torch.logsumexp(top, dim=-1, keepdim=True)
        entropy = -(log_p.exp() * log_p).sum(-1)
        weight = torch.pow(entropy / EAFT_ENTROPY_SCALE, alpha)
    return ce * weight


def kl_token(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ policy) per row [N], summed over the vocabulary (torch's kl_div with the policy's log-probs
    as input and the reference's probabilities as target, LLaMA-Factory's `_kl_divergence`)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    q = F.softmax(ref_logits.float(), dim=-1)
    return F.kl_div(log_p, q, reduction="none").sum(-1)


def asft_token_loss(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.1):
    """DFT plus alpha × KL(reference ‖ policy), per token [N]."""
    logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    return dft_token_loss(logps) + alpha * kl_token(logits, ref_logits)


def _targets(batch: dict, mask: torch.Tensor) -> torch.Tensor:
    return batch["labels"][:, 1:][mask]


class DFTLoss(CausalLMLoss):
    """sft with `use_dft_loss`: the label tokens' log-probs come from the same (fused) path as cross-entropy."""

    def loss(self, outputs, batch: dict) -> tuple[torch.Tensor, dict]:
        return dft_token_loss(outputs.values).sum(), {}


class EAFTLoss(CausalLMLoss):
    """sft with `use_eaft_loss`: needs the logits at the label positions (for their top-20 entropy)."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def forward(self, model, batch: dict):
        return scored_logits(model, model_inputs(batch), batch["labels"])

    def loss(self, outputs, batch: dict) -> tuple[torch.Tensor, dict]:
        return eaft_token_loss(outputs.logits, _targets(batch, outputs.mask), self.alpha).sum(), {}


class ASFTLoss(CausalLMLoss):
    """sft with `use_asft_loss`: the policy's and the frozen reference's logits at the label positions."""

    def __init__(self, alpha: float, ref):
        self.alpha, self.ref = alpha, ref

    def forward(self, model, batch: dict):
        inputs = model_inputs(batch)
        with torch.no_grad(), self.ref.use(model) as ref_model:
            ref_logits = scored_logits(ref_model, inputs, batch["labels"]).logits
        return scored_logits(model, inputs, batch["labels"]), ref_logits

    def loss(self, outputs, batch: dict) -> tuple[torch.Tensor, dict]:
        scored, ref_logits = outputs
        per_token = asft_token_loss(scored.logits, ref_logits, _targets(batch, scored.mask), self.alpha)
        kl = kl_token(scored.logits.detach(), ref_logits)
        return per_token.sum(), {"kl": metric(kl.sum(), kl.numel())}


def sft_loss(cfg, frozen: dict) -> CausalLMLoss:
    """The sft loss the config asks for: cross-entropy unless one of LLaMA-Factory's token losses is on."""
    f = cfg.finetuning
    if f.use_dft_loss:
        return DFTLoss()
    if f.use_eaft_loss:
        return EAFTLoss(f.eaft_alpha)
    if f.use_asft_loss:
        return ASFTLoss(f.asft_alpha, frozen["reference"])
    return CausalLMLoss()
