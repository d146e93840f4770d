"""Token log-probs at the label positions: the one place where hidden states meet the output layer.

Every stage takes its log-probs, and so its token losses, from `label_logps`. The model's output layer is
handed only the hidden states of the positions that have a label (a forward pre-hook on it picks them), so
prompt and padding positions cost no logits, and the layer still runs inside the model's own forward, where
FSDP2 and DeepSpeed ZeRO-3 have its weight gathered. A chunked, fused (Liger) or vocab-parallel
cross-entropy plugs in here and nowhere else.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F

from lf_dist.data.tokenize import IGNORE_INDEX

# Flat indices (row * seq_len + position) of the hidden states the output layer should see in this forward.
_POSITIONS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("lf_dist_positions", default=None)


def _pick_positions(module, args):
    index = _POSITIONS.get()
    if index is None:  # an ordinary forward (generation, export checks): all positions
        return None
    hidden = args[0]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).unsqueeze(0)
    return (picked, *args[1:])


def output_layer(model) -> torch.nn.Module:
    """The model's output layer (lm_head), through DDP / DeepSpeed / peft wrappers."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    layer = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if layer is None:
        raise RuntimeError(f"{type(inner).__name__} has no output layer (get_output_embeddings() is None)")
    return layer


def _ensure_hook(model) -> None:
    layer = output_layer(model)
    if not getattr(layer, "_lf_dist_picks_positions", False):
        layer.register_forward_pre_hook(_pick_positions)
        layer._lf_dist_picks_positions = True


def label_logps(model, inputs: dict, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """log p(labels[t + 1] | tokens ≤ t) at the scored positions, in fp32, row-major order.

    `mask` [B, T-1] says which positions t are scored (default: those whose next label is not IGNORE_INDEX).
    Returns (log-probs [N], mask). Sums of these are what the stages' losses are made of.
    """
    if mask is None:
        mask = labels[:, 1:] != IGNORE_INDEX
    _ensure_hook(model)
    index = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(-1)
    token = _POSITIONS.set(index)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        _POSITIONS.reset(token)
    if logits.shape[:2] != (1, index.numel()):  # a model that computes logits outside its output layer
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index).unsqueeze(0)
    # cross_entropy fuses log-softmax and the pick (forward and backward): cheaper than gather - logsumexp
    return -F.cross_entropy(logits[0].float(), labels[:, 1:][mask], reduction="none"), mask


def sequence_logps(model, inputs: dict, labels: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int):
    """Summed log-probs of each sequence's label tokens and their count, from rows that may hold several
    sequences (packing): token t+1 is scored by position t only when both belong to the same sequence."""
    target_seq = seq_ids[:, 1:]
    mask = (labels[:, 1:] != IGNORE_INDEX) & (target_seq >= 0) & (seq_ids[:, :-1] == target_seq)
    token_logps, mask = label_logps(model, inputs, labels, mask)
    seqs = target_seq[mask]
    sums = torch.zeros(n_seqs, device=token_logps.device, dtype=token_logps.dtype).index_add(0, seqs, token_logps)
    counts = torch.zeros_like(sums).index_add(0, seqs, torch.ones_like(token_logps))
    return sums, counts
