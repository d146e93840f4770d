"""LoRA's forward without two full-width passes per adapted layer.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies the [tokens × out_features]
update (one pass forward, one more in backward) and the sum is a new tensor of the same size. The same function
scales the [tokens × r] activations between A and B instead (r = 8: nothing) and adds the update into the base
layer's output in place. Results equal peft's up to fp32 rounding (bitwise when the scaling is a power of two,
as with LLaMA-Factory's default lora_alpha); on the 2-core build CPU a LoRA step is 2–6% faster
(benchmarks/bench_lora.py). Only plain LoRA layers (`peft.tuners.lora.layer.Linear`, no DoRA or other variant,
no bias on B) take this path, and only in the ordinary case; everything else (adapters disabled or merged,
per-example adapter names, several active adapters) runs peft's own forward. Modules are called as modules, so
backends that gather parameters in module hooks (DeepSpeed ZeRO-3, FSDP) see every call they expect.
"""

from __future__ import annotations

import types

import torch


def _plain(layer, name: str) -> bool:
    return name in layer.lora_A and name not in layer.lora_variant and layer.lora_B[name].bias is None


def lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward bound to each plain LoRA layer by `apply` (`self` is the peft layer)."""
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or not _plain(self, active[0]):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    lora_a = self.lora_A[name]
    low_rank = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    update = self.lora_B[name](low_rank * self.scaling[name])  # scaling read per call, as peft does (set_scale)
    if update.dtype != result.dtype:  # a base in another dtype than the adapter: peft's promotion, then back
        return (result + update).to(result.dtype)
    return result.add_(update)


def apply(model) -> int:
    """Bind the lean forward to every plain LoRA layer of `model` (a PeftModel); returns how many."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if type(module) is not Linear or getattr(module, "_lf_lean", False):
            continue
        module.forward = types.MethodType(lean_forward, module)
        module._lf_lean = True
        n += 1
    return n
