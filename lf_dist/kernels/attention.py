"""Variable-length attention: examples laid end to end in a row attend only within themselves, with no mask.

Registered in transformers' attention interface as `lf_varlen`. Where the examples of a row begin is given
explicitly, as `cu_seq_lens_q` (cumulative lengths over the flattened rows, transformers' flash-attention
keyword) — never guessed from position_ids, because LLaMA-Factory's plain `packing` also restarts positions
but lets the examples of a row see each other. Without boundaries it is plain causal attention (sdpa), or the
padding mask transformers builds when one is given (generation).

- CUDA: `torch.nn.attention.varlen.varlen_attn`, one kernel over all segments, where torch has it.
- Elsewhere: one `is_causal` sdpa call per segment. On the 2-core build CPU this is 1.9× faster than sdpa with
  a block-diagonal mask over the same tokens, and 3.5× faster than the padded batch (bench_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lf_varlen"


def boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens int32 [n + 1], longest segment) of rows whose segments start where position_ids is 0."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(-1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _windowed(length: int, window: int, device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


def _segment(query, key, value, window, scaling, dropout, gqa: bool) -> torch.Tensor:
    """Causal attention of one segment, [1, H, L, D]."""
    length = query.shape[2]
    mask = _windowed(length, window, query.device) if window and length > window else None
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa
    )


def varlen_attention(
    module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("lf_varlen attention has no logit softcapping or attention sinks; use eager")
    if cu_seq_lens_q is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    b, hq, t, d = query.shape
    gqa = key.shape[1] != hq
    if query.is_cuda and dropout == 0.0 and _has_varlen():
        from torch.nn.attention.varlen import varlen_attn

        def tokens(x):  # [B, H, T, D] → [B·T, H, D]
            return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

        window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        longest = max_length_q if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = varlen_attn(
            tokens(query), tokens(key), tokens(value), cu, cu, longest, longest,
            scale=scaling, window_size=window, enable_gqa=gqa,
        )  # fmt: skip
        return out.reshape(b, t, hq, d), None
    q, k, v = ((x.transpose(0, 1).reshape(x.shape[1], b * t, d)[None] if b > 1 else x) for x in (query, key, value))
    cuts = cu_seq_lens_q.tolist()
    p = dropout if module.training else 0.0
    out = torch.cat(
        [
            _segment(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], sliding_window, scaling, p, gqa)
            for s, e in zip(cuts[:-1], cuts[1:])
        ],
        dim=2,
    )  # [1, Hq, B·T, D]
    return out[0].reshape(hq, b, t, d).permute(1, 2, 0, 3), None


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _mask(*args, attention_mask=None, **kwargs):
    """No mask for separated rows or plain causal rows; the sdpa mask when a padding mask is given."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `attn_implementation="lf_varlen"` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
