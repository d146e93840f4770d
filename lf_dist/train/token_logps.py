"""Token log-probs at the label positions: the one place where hidden states meet the output layer.

Every stage takes its log-probs, and so its token losses, from `label_logps`. The model's output layer is
handed only the hidden states of the positions that have a label (its forward is wrapped once), so prompt and
padding positions cost no logits, and the layer still runs inside the model's own forward, where FSDP2 and
DeepSpeed ZeRO-3 have its weight gathered. A plain linear output layer then goes through a chunked linear
cross-entropy (`kernels/cross_entropy.py`), or Liger's fused one when the model was patched with Liger
(`kernels/liger.py`): no [tokens × vocabulary] logits exist at any time. Any other output layer (adapters on
it, quantized) computes the picked positions' logits, and cross-entropy follows.
"""

from __future__ import annotations

import contextvars
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lf_dist.data.tokenize import IGNORE_INDEX
from lf_dist.kernels.cross_entropy import linear_logps
from lf_dist.log import get_logger

logger = get_logger(__name__)


@dataclass
class _Request:
    index: torch.Tensor  # flat indices (row * seq_len + position) of the hidden states to score
    targets: torch.Tensor  # the label of each
    result: torch.Tensor | None = None  # log-probs, when the output layer computed them itself
    shaped: torch.Tensor | None = None  # the same [1, N, 1], as the output layer returned them


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("lf_dist_request", default=None)


def output_layer(model) -> torch.nn.Module:
    """The model's output layer (lm_head), through DDP / DeepSpeed / peft wrappers."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    layer = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if layer is None:
        raise RuntimeError(f"{type(inner).__name__} has no output layer (get_output_embeddings() is None)")
    return layer


def _fused_logps(layer):
    """The log-prob function of a plain linear output layer: Liger's where the model was patched, else ours."""
    if getattr(layer, "lf_dist_liger", False):
        from lf_dist.kernels.liger import linear_logps as liger_logps

        return liger_logps
    return linear_logps


def _forward(self, hidden, *args, **kwargs):
    """The output layer's forward while `label_logps` asks for log-probs; its own forward otherwise."""
    request = _REQUEST.get()
    if request is None:  # an ordinary forward (generation, export checks): all positions
        return self._lf_dist_inner(hidden, *args, **kwargs)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, request.index)
    if self._lf_dist_fused and not args and not kwargs:
        request.result = _fused_logps(self)(picked, self.weight, self.bias, request.targets)
        # shaped like logits, so the model's forward passes it on; a copy (N floats), not a view: FSDP2 warns
        # about views among a module's outputs (an in-place op on one would skip its gradient hooks)
        request.shaped = request.result[None, :, None].clone()
        return request.shaped
    return self._lf_dist_inner(picked[None], *args, **kwargs)


def _wrap(layer: torch.nn.Module) -> None:
    """Wrap the layer's forward once; bound methods, so a deep copy of the model wraps its own layer."""
    if getattr(layer, "_lf_dist_wrapped", False):
        return
    layer._lf_dist_inner = layer.forward
    layer._lf_dist_fused = type(layer) is torch.nn.Linear  # adapters or quantization on it: logits, then CE
    layer.forward = types.MethodType(_forward, layer)
    layer._lf_dist_wrapped = True


def label_logps(model, inputs: dict, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """log p(labels[t + 1] | tokens ≤ t) at the scored positions, in fp32, row-major order.

    `mask` [B, T-1] says which positions t are scored (default: those whose next label is not IGNORE_INDEX).
    Returns (log-probs [N], mask). Sums of these are what the stages' losses are made of.
    """
    if mask is None:
        mask = labels[:, 1:] != IGNORE_INDEX
    layer = output_layer(model)
    _wrap(layer)
    index = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(-1)
    targets = labels[:, 1:][mask]
    request = _Request(index, targets)
    token = _REQUEST.set(request)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        _REQUEST.reset(token)
    if request.result is not None:
        if logits.data_ptr() == request.shaped.data_ptr() and logits.numel() == targets.numel():
            # Through the model's own output, not `request.result`: FSDP2 and ZeRO-3 hook the outputs to gather
            # the output layer's weight again before its backward (and to reduce its gradient after).
            return logits.reshape(-1), mask
        # The model changed what its output layer returned (logit soft-capping or scaling): from now on the
        # layer gives logits and the model's own post-processing applies.
        logger.warning(f"{type(model).__name__} post-processes its logits: cross-entropy is not fused for it")
        layer._lf_dist_fused = False
        return label_logps(model, inputs, labels, mask)
    if logits.shape[:2] != (1, index.numel()):  # a model that computes logits outside its output layer
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index).unsqueeze(0)
    # cross_entropy fuses log-softmax and the pick (forward and backward): cheaper than gather - logsumexp
    return -F.cross_entropy(logits[0].float(), targets, reduction="none"), mask


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
