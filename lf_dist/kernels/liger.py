"""Liger's Triton kernels on CUDA: RMSNorm, RoPE, SwiGLU / GeGLU patched into a loaded model, and its fused
linear cross-entropy for the label log-probs (`train/token_logps.py` calls `linear_logps`).

Liger's own model forward (which computes a mean loss from labels) is not used: every stage needs per-token
log-probs, and the output layer keeps running inside the model's forward, so FSDP2 has its weight gathered.
`reduction="none"` gradients are right from liger-kernel 0.8.2 on (its PR #1298), hence the minimum.
"""

from __future__ import annotations

import importlib.metadata

import torch

MIN_VERSION = (0, 8, 2)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3")


def version() -> str | None:
    """The installed liger-kernel version, None when missing."""
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_version(found: str | None) -> bool:
    if not found:
        return False
    parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    return parts >= MIN_VERSION


def supports(model_type: str) -> bool:
    return model_type in FAMILIES


def apply(model) -> None:
    """Patch a loaded (not yet adapter-wrapped) model in place; mark its output layer for the fused CE."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        geglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,  # the loss is ours: per-token log-probs through `linear_logps`
    )
    model.get_output_embeddings().lf_dist_liger = True


def linear_logps(hidden, weight, bias, targets) -> torch.Tensor:
    """fp32 log-probs [N] of `targets` under softmax(hidden @ weight.T + bias), by Liger's fused kernel."""
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    # positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    # reduction); the first output is the per-token loss
    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, bias, None, -100, 0.0, 0.0, "none")[0]
    return -loss.float()
