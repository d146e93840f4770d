"""4-bit NF4 weights that FSDP2 shards: torchao's `NF4Tensor` (what torchtune's QLoRA under FSDP2 uses).

NF4Tensor implements FSDP2's all-gather extension (`fsdp_pre_all_gather` / `fsdp_post_all_gather`): each rank
stores 1/N of a layer's 4-bit codes, its 8-bit block scalers and their fp32 factors, and a layer's worth is
gathered when it runs. bitsandbytes' 4-bit weights do not shard under FSDP2 (../shared/FINDINGS.md), so they stay
the single-device route and this one is FSDP2's.

The block rule: codes are grouped in blocks of 64 values, whose scalers are quantized again in blocks of 256, so a
weight splits over N shards only if its rows and its rows·cols / 16,384 both divide by N. A layer that fails
the rule stays in the compute dtype and the plan names it. Only the decoder's frozen linear layers are
quantized (as bitsandbytes does: embeddings, norms and the output layer keep the compute dtype).
"""

from __future__ import annotations

import torch

BLOCK = 64  # values per 4-bit block (one scaler each)
SCALER_BLOCK = 256  # scalers per second-level block (one fp32 factor each)
QUANT_UNIT = BLOCK * SCALER_BLOCK


def bytes_per_value() -> float:
    """Stored bytes per weight value: a 4-bit code, an 8-bit scaler per 64 and an fp32 factor per 16,384."""
    return 0.5 + 1 / BLOCK + 4 / QUANT_UNIT


def splits(rows: int, cols: int, shards: int) -> bool:
    """Whether a rows × cols weight quantizes to NF4 and shards evenly over `shards` ranks."""
    return rows % shards == 0 and (rows * cols) % (QUANT_UNIT * shards) == 0


def _to_nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:  # torchao <= 0.17
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


def is_nf4(tensor) -> bool:
    local = getattr(tensor, "_local_tensor", tensor)
    return type(local).__name__ == "NF4Tensor"


def nf4_params(model) -> set:
    """The NF4 weights of a model (its quantized base)."""
    return {p for p in model.parameters() if is_nf4(p)}


def quantizable_linears(model, layers) -> dict[str, torch.nn.Linear]:
    """The frozen `nn.Linear` modules inside the decoder `layers`, by name (peft's base layers included)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if id(module) in inside
        and type(module) is torch.nn.Linear
        and not module.weight.requires_grad
        and module.weight.dim() == 2
    }


def transform(model, layers, shards: int) -> tuple:
    """For a model made whole tensor by tensor (`sharded_load.materialize`): a function that turns each decoder
    linear weight that splits over `shards` into NF4 as it is read, and the list it fills with the names of those
    that stay in the compute dtype."""
    to_nf4, kept = _to_nf4(), []
    linears = {id(m): name for name, m in quantizable_linears(model, layers).items()}

    def make(module, name, value):
        if name != "weight" or id(module) not in linears:
            return None
        if not splits(*value.shape, shards):
            kept.append(linears[id(module)])
            return None
        return torch.nn.Parameter(to_nf4(value.contiguous(), BLOCK, SCALER_BLOCK), requires_grad=False)

    return make, kept


def quantize(model, layers, shards: int) -> list[str]:
    """Replace the decoder's frozen linear weights by NF4 where the block rule allows `shards` ranks; returns the
    names of the linear layers that stay in the compute dtype."""
    to_nf4 = _to_nf4()
    kept = []
    for name, linear in quantizable_linears(model, layers).items():
        rows, cols = linear.weight.shape
        if not splits(rows, cols, shards):
            kept.append(name)
            continue
        weight = linear.weight.detach().contiguous()
        linear.weight = torch.nn.Parameter(to_nf4(weight, BLOCK, SCALER_BLOCK), requires_grad=False)
        del weight
    return kept
