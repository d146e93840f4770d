"""float8 training through torchao (`fp8: true`, fp8_backend torchao or auto): the decoder's linear layers become
torchao's Float8Linear, whose matmuls run in float8 with dynamic tensor-wise scales while weights, gradients and
optimizer states stay in their own dtype; with `fp8_enable_fsdp_float8_all_gather`, FSDP2 all-gathers the weights
in float8 (half of bf16's traffic). Needs a CUDA GPU with float8 tensor cores (compute capability 8.9: Ada,
Hopper and newer); the plan refuses fp8 elsewhere, before anything is loaded.
"""

from __future__ import annotations

import torch

MIN_CAPABILITY = (8, 9)
# torchao's float8 matmul (torch._scaled_mm) needs both dimensions of a weight divisible by 16
ALIGNMENT = 16


def supported_here() -> str | None:
    """Why float8 training cannot run on this machine, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU with float8 tensor cores (compute capability 8.9+: L4, L40, H100, RTX 4090)"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"this GPU's compute capability {capability[0]}.{capability[1]} has no float8 tensor cores (8.9+)"
    return None


def apply(model: torch.nn.Module, fsdp_float8_all_gather: bool = False) -> int:
    """Swap the model's linear layers (not its output layer, whose logits stay in the compute dtype, as torchtitan
    does) for torchao's Float8Linear; returns how many were converted. Works on a meta-device model."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted = []

    def convertible(module: torch.nn.Module, fqn: str) -> bool:
        ok = (
            isinstance(module, torch.nn.Linear)
            and module is not output
            and module.in_features % ALIGNMENT == 0
            and module.out_features % ALIGNMENT == 0
        )
        if ok:
            converted.append(fqn)
        return ok

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=convertible)
    return len(converted)


def precompute_scales(model: torch.nn.Module) -> None:
    """After an optimizer step with float8 all-gather: every weight's scale in one all-reduce (torchao's advice)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
