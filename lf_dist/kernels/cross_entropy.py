"""Chunked linear cross-entropy: log p(target | hidden) through the output layer without [tokens × vocab] logits.

`linear_logps(hidden [N, H], weight [V, H], bias, targets [N])` gives the fp32 log-probs of the targets. The
logits exist one chunk of tokens at a time (16 MiB of fp32 logits, at least 256 tokens); the forward also
keeps d logp / d hidden ([N, H], the one thing the backward needs when the output layer is frozen, as under
LoRA), and the backward recomputes a chunk's softmax only when the weight (or bias) itself is trained.
Every chunk's logits go into one buffer, turned into probabilities in place: fresh [chunk × vocab] tensors per
chunk (the logits, logsumexp's temporary) cost page faults, a third of the output layer's time in the packed
LoRA benchmark on the build CPU (420 → 280 ms per step).
Precision follows the plain path: the matmuls run in the weight's dtype, softmax and log-probs in fp32.
"""

from __future__ import annotations

import torch

# fp32 logits per chunk (16 MiB): small enough to stay in cache for the softmax passes (256 tokens at a 16k
# vocabulary, measured fastest of 64-2048 tokens on the build CPU), but never fewer than MIN_CHUNK_TOKENS tokens,
# below which the matmuls get slow (27 tokens at 152k: 2.3x the time of 256)
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_TOKENS = 256


def chunk_size(vocab: int) -> int:
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // max(vocab, 1))


def _chunk_logits(hidden, weight, bias, out: torch.Tensor) -> torch.Tensor:
    """One chunk's fp32 logits, written into `out`; the matmul in the weight's dtype, as F.linear."""
    if weight.dtype != torch.float32:
        return out.copy_(hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t()))
    return torch.mm(hidden, weight.t(), out=out) if bias is None else torch.addmm(bias, hidden, weight.t(), out=out)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Turn `logits` into softmax probabilities in place; returns logsumexp [n] (no temporary [n, V] tensor)."""
    top = logits.amax(1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(1, keepdim=True)
    logits.div_(sums)
    return (top + sums.log()).squeeze(1)


def _buffer(n: int, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.empty(min(n, chunk_size(weight.shape[0])), weight.shape[0], device=hidden.device, dtype=torch.float32)


@torch.no_grad()
def _forward(hidden, weight, bias, targets, keep_grad: bool):
    n, step = hidden.shape[0], chunk_size(weight.shape[0])
    logps = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse_all = torch.empty_like(logps)
    d_hidden = torch.empty_like(hidden) if keep_grad else None
    buf = _buffer(n, weight, hidden)
    for s in range(0, n, step):
        h, y = hidden[s : s + step], targets[s : s + step]
        logits = _chunk_logits(h, weight, bias, buf[: h.shape[0]])
        picked = logits.gather(1, y[:, None]).squeeze(1)
        lse = _softmax_(logits)
        logps[s : s + step] = picked - lse
        lse_all[s : s + step] = lse
        if keep_grad:  # d logp / d h = W[y] − softmax · W
            torch.addmm(weight[y], logits.to(weight.dtype), weight, alpha=-1, out=d_hidden[s : s + step])
    return logps, lse_all, d_hidden


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        need_hidden = ctx.needs_input_grad[0]
        logps, lse, d_hidden = _forward(hidden, weight, bias, targets, keep_grad=need_hidden)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, d_hidden)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse, d_hidden = ctx.saved_tensors
        _, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_hidden = (d_hidden * grad_logps[:, None].to(d_hidden.dtype)) if d_hidden is not None else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias else None
        if need_weight or need_bias:
            step, buf = chunk_size(weight.shape[0]), _buffer(hidden.shape[0], weight, hidden)
            for s in range(0, hidden.shape[0], step):
                h, y = hidden[s : s + step], targets[s : s + step]
                logits = _chunk_logits(h, weight, bias, buf[: h.shape[0]])
                grad = logits.sub_(lse[s : s + step, None]).exp_().neg_()  # d logp(y) / d logits = onehot(y) − softmax
                grad[torch.arange(y.numel(), device=grad.device), y] += 1.0
                grad.mul_(grad_logps[s : s + step, None])
                if need_weight:  # accumulated in fp32 across chunks
                    grad_weight += (grad.t().to(weight.dtype) @ h).float()
                if need_bias:
                    grad_bias += grad.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
        )


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """fp32 log-probs [N] of `targets` under softmax(hidden @ weight.T + bias), chunked (see the module doc)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _forward(hidden, weight, bias, targets, keep_grad=False)[0]
    return _LinearLogps.apply(hidden, weight, bias, targets)
