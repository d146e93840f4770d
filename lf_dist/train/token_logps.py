"""Token log-probs at the label positions: the one place where hidden states meet the output layer.

Every stage takes its log-probs, and so its token losses, from `label_logps`. For that one call the causal-LM
module's forward is `scored_forward`: the decoder, then the output layer on the hidden states of the positions
that have a label only, so prompt and padding positions cost no logits. It still runs inside the model's own
call, through every wrapper (peft, DDP, FSDP2, DeepSpeed), whose hooks gather the weights it reads and reduce
their gradients. A plain linear output layer then goes through a chunked linear cross-entropy
(`kernels/cross_entropy.py`), or Liger's fused one when the model was patched with Liger (`kernels/liger.py`):
no [tokens × vocabulary] logits exist at any time. Any other output layer (adapters on it, quantized) gives the
logits of those positions, and cross-entropy follows. A model that changes its logits after the output layer
(soft-capping, scaling), or makes them without it, keeps its own forward, with the output layer handed the label
positions only: the first call for each model finds out, with one forward of two tokens (`_keeps_logits`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lf_dist.data.tokenize import IGNORE_INDEX
from lf_dist.kernels.cross_entropy import linear_logps
from lf_dist.log import get_logger

logger = get_logger(__name__)

VERDICT = "_lf_dist_keeps_logits"  # set on the causal-LM module: whether `scored_forward` may replace its forward


class TokenLogps(NamedTuple):
    values: torch.Tensor  # log p(label) at each scored position, fp32, row-major order [N]
    mask: torch.Tensor  # [B, T-1]: which positions t (scoring label t+1) are in `values`


def causal_lm(model) -> torch.nn.Module:
    """The Hugging Face *ForCausalLM module inside DDP / DeepSpeed / peft wrappers."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def output_layer(model) -> torch.nn.Module:
    """The model's output layer (lm_head), through DDP / DeepSpeed / peft wrappers."""
    lm = causal_lm(model)
    layer = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if layer is None:
        raise RuntimeError(f"{type(lm).__name__} has no output layer (get_output_embeddings() is None)")
    return layer


def _fused_logps(layer):
    """The log-prob function of a plain linear output layer: Liger's where the model was patched, else ours."""
    if getattr(layer, "lf_dist_liger", False):
        from lf_dist.kernels.liger import linear_logps as liger_logps

        return liger_logps
    return linear_logps


def _keeps_logits(model, lm, layer, inputs: dict) -> bool:
    """Whether the model returns its output layer's result untouched (no soft-capping, scaling, or logits made
    elsewhere) and has a decoder to run on its own, so that `scored_forward` computes what its forward would.
    Found out once per model, every rank alike: one forward of two tokens without gradients, in which the
    output layer's result is compared with what the model returns, by storage."""
    if VERDICT not in lm.__dict__:
        decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
        own, returned = layer.forward, []

        def probe(*args, **kwargs):
            returned.append(own(*args, **kwargs))
            return returned[-1]

        # no gradients, and no random numbers drawn (dropout): a resumed run probes at another step than the
        # uninterrupted one, and must see the same random stream
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices), _forward_as(layer, probe):
            logits = model(input_ids=inputs["input_ids"][:1, :2], use_cache=False).logits
        same = bool(returned) and logits.shape == returned[-1].shape and logits.data_ptr() == returned[-1].data_ptr()
        lm.__dict__[VERDICT] = isinstance(decoder, torch.nn.Module) and same
        if not same:
            logger.warning(f"{type(lm).__name__} post-processes its logits: cross-entropy is not fused for it")
    return lm.__dict__[VERDICT]


@contextlib.contextmanager
def _forward_as(module: torch.nn.Module, forward):
    """`module.forward` is `forward` inside the block (its hooks still run), its own after."""
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def scored_forward(lm, layer, index: torch.Tensor, targets: torch.Tensor | None):
    """The causal LM's forward for one scoring call: the decoder's hidden states at the flat positions `index`
    go through the output layer, which returns their log-probs of `targets` [N] (`targets` given: a plain linear
    layer, in the fused kernel) or their logits [N, V]."""
    decoder = getattr(lm, lm.base_model_prefix)

    def forward(*args, **kwargs):
        # peft passes labels / return_dict / output_* explicitly, mostly None; the decoder takes the inputs
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("labels", "logits_to_keep")}
        hidden = decoder(*args, **kwargs).last_hidden_state
        return layer(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index))

    return forward


def label_logps(model, inputs: dict, labels: torch.Tensor, mask: torch.Tensor | None = None, fused=None):
    """log p(labels[t + 1] | tokens ≤ t) at the scored positions, in fp32, row-major order.

    `mask` [B, T-1] says which positions t are scored (default: those whose next label is not IGNORE_INDEX).
    `fused` None: the fused kernel wherever the output layer is a plain linear one. Returns TokenLogps (values,
    mask); sums of these are what the stages' losses are made of.
    """
    if mask is None:
        mask = labels[:, 1:] != IGNORE_INDEX
    lm, layer = causal_lm(model), output_layer(model)
    index = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(-1)
    targets = labels[:, 1:][mask]
    if not _keeps_logits(model, lm, layer, inputs):
        return TokenLogps(_own_forward_logps(model, layer, inputs, index, targets), mask)
    if fused is None:
        fused = type(layer) is torch.nn.Linear  # adapters or quantization on it: logits, then cross-entropy
    with contextlib.ExitStack() as swaps:
        swaps.enter_context(_forward_as(lm, scored_forward(lm, layer, index, targets if fused else None)))
        if fused:
            fused_fn = _fused_logps(layer)
            swaps.enter_context(_forward_as(layer, lambda h: fused_fn(h, layer.weight, layer.bias, targets)))
        scores = model(**inputs, use_cache=False)
    if fused:
        return TokenLogps(scores.reshape(-1), mask)
    # cross_entropy fuses log-softmax and the pick (forward and backward): cheaper than gather - logsumexp
    return TokenLogps(-F.cross_entropy(scores.float(), targets, reduction="none"), mask)


def _own_forward_logps(model, layer, inputs: dict, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own forward, its output layer handed the label positions only, so its logits (as the model
    post-processes them) exist for those positions alone."""
    own = layer.forward

    def picked(hidden, *args, **kwargs):
        return own(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)[None], *args, **kwargs)

    with _forward_as(layer, picked):
        logits = model(**inputs, use_cache=False).logits
    if logits.shape[:2] != (1, index.numel()):  # a model that makes its logits without its output layer
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index).unsqueeze(0)
    return -F.cross_entropy(logits[0].float(), targets, reduction="none")


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


class ScoredLogits(NamedTuple):
    logits: torch.Tensor  # the output layer's logits at the scored positions [N, V], row-major order
    mask: torch.Tensor  # [B, T-1], as in TokenLogps
    values: torch.Tensor | None  # the value head's output at the same positions [N] (ppo), else None


def scored_logits(model, inputs: dict, labels: torch.Tensor, value_head: torch.nn.Module | None = None):
    """Logits (and a value head's outputs on the same hidden states) at the positions whose next label is not
    IGNORE_INDEX: what online RL reads to take temperature-scaled log-probs and entropies of completions. Runs
    inside the model's own call, like `label_logps`, so every wrapper's hooks see it."""
    mask = labels[:, 1:] != IGNORE_INDEX
    lm, layer = causal_lm(model), output_layer(model)
    index = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(-1)
    if not _keeps_logits(model, lm, layer, inputs):
        if value_head is not None:
            raise RuntimeError(f"{type(lm).__name__} post-processes its logits: no value head on it")
        logits = _own_forward_logits(model, layer, inputs, index)
        return ScoredLogits(logits, mask, None)
    values = []
    decoder = getattr(lm, lm.base_model_prefix)

    def forward(*args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("labels", "logits_to_keep")}
        hidden = decoder(*args, **kwargs).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        if value_head is not None:
            values.append(value_head(picked.to(value_head.weight.dtype)).squeeze(-1).float())
        return layer(picked)

    with _forward_as(lm, forward):
        logits = model(**inputs, use_cache=False)
    return ScoredLogits(logits, mask, values[0] if values else None)


def _own_forward_logits(model, layer, inputs: dict, index: torch.Tensor) -> torch.Tensor:
    own = layer.forward

    def picked(hidden, *args, **kwargs):
        return own(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)[None], *args, **kwargs)

    with _forward_as(layer, picked):
        logits = model(**inputs, use_cache=False).logits
    if logits.shape[:2] != (1, index.numel()):
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index).unsqueeze(0)
    return logits[0]


def logps_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """log p(target) and the entropy (without gradient) of each row's distribution at `temperature`, in fp32
    (TRL's order: logits divided by the temperature, then log-softmax)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():  # logged, never differentiated (as TRL)
        entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy
