"""A sharded model loaded without any rank holding it whole: each rank reads only its rows of every weight.

Every rank builds the model on the meta device, FSDP2 shards it, and each rank then reads its rows of each base
weight from the checkpoint's safetensors files (`get_slice`: only those bytes) and cuts its rows of the tensors
it makes itself: LoRA's initial weights (peft's draws replayed from the same random state, so they equal a
loaded model's: tested against one process) and the non-persistent buffers (rotary tables). Where a skeleton
tensor has no counterpart of the same shape in the files (a new head, resized embeddings, weights a conversion
renames, `.bin` checkpoints, a trained adapter to load, another LoRA init), `sources` says so and the strategy
falls back to rank 0 building the model for real and handing out its tensors.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")  # what a plain cast reads right (not FP8 codes that need their scales)


def checkpoint_files(folder: str | Path) -> dict[str, Path] | None:
    """Checkpoint key → the safetensors file that holds it; None without safetensors."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SAFETENSORS).is_file():
        from safetensors import safe_open

        with safe_open(folder / SAFETENSORS, "pt") as f:
            return dict.fromkeys(f.keys(), folder / SAFETENSORS)
    return None


def checkpoint_key(name: str) -> str:
    """The checkpoint's name of a skeleton tensor (peft's wrapping removed)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _rebuilt_buffers(model) -> dict[str, torch.Tensor] | None:
    """The meta buffers of a skeleton (rotary tables), computed by building their module anew from its config."""
    out = {}
    for prefix, module in model.named_modules():
        names = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not names:
            continue
        if any(True for _ in module.parameters()):  # only small parameterless modules (rotary tables) are rebuilt
            return None
        try:
            with torch.device("cpu"):
                fresh = type(module)(module.config)
        except Exception:  # noqa: BLE001 - any module we cannot rebuild sends the load back to rank 0
            return None
        for n in names:
            out[f"{prefix}.{n}" if prefix else n] = getattr(fresh, n).detach().clone()
    return out


def _lora_layers(skeleton) -> list | None:
    """peft's adapted layers in creation (module) order, as (prefix, A, B, base dtype); None for what is not
    replayed (another init, DoRA, bias)."""
    config = getattr(skeleton, "peft_config", {}).get("default")
    if config is None:
        return []
    # OFT (no init_lora_weights), PiSSA and the other inits are made by rank 0 for real
    init = getattr(config, "init_lora_weights", None)
    if init is not True or config.use_dora or getattr(config, "lora_bias", False):
        return None
    from peft.tuners.lora import LoraLayer

    return [
        (prefix, m.lora_A["default"].weight, m.lora_B["default"].weight, m.get_base_layer().weight.dtype)
        for prefix, m in skeleton.named_modules()
        if isinstance(m, LoraLayer) and "default" in getattr(m, "lora_A", {})
    ]


def _draw_lora(layers: list) -> dict[str, torch.Tensor]:
    """LoRA's initial weights as peft makes them on a loaded base, from the current random state: per layer, its
    two `nn.Linear` draw their own init, then A is drawn again (kaiming uniform) and B zeroed, both cast to the
    base layer's dtype (the trainable copy is fp32 again after)."""
    import math

    out = {}
    for prefix, a, b, base_dtype in layers:
        for shape in (a.shape, b.shape):  # nn.Linear's own reset_parameters
            torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
        value = torch.nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5))
        out[f"{prefix}.lora_A.default.weight"] = value.to(base_dtype).to(a.dtype)
        out[f"{prefix}.lora_B.default.weight"] = torch.zeros(b.shape, dtype=b.dtype)
    return out


def sources(skeleton, folder: str | Path, load_dtype: torch.dtype, trained_adapter: bool = False) -> dict | None:
    """Where each tensor of the skeleton comes from: ("file", path, key, the dtype a loaded model has it in: a
    trainable weight is loaded so and then upcast) or ("value", tensor); None when one has no
    source (the caller falls back to loading on rank 0). LoRA's weights are drawn last, once the rest is known
    to load, so that a fallback draws them exactly as a loaded model does."""
    from safetensors import safe_open

    config = getattr(skeleton.get_base_model() if hasattr(skeleton, "get_base_model") else skeleton, "config", None)
    if getattr(config, "quantization_config", None):  # FP8 / GPTQ weights need the loader's dequantization
        return None
    files, rebuilt, layers = checkpoint_files(folder), _rebuilt_buffers(skeleton), _lora_layers(skeleton)
    if files is None or rebuilt is None or layers is None or trained_adapter:
        return None
    lora = {f"{prefix}.lora_{x}.default.weight" for prefix, *_ in layers for x in "AB"}
    out, shapes = {}, {}
    for name, tensor in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
        if not tensor.is_meta:
            out[name] = ("value", tensor.detach().clone())
        elif name in rebuilt:
            out[name] = ("value", rebuilt[name])
        elif name not in lora:
            key = checkpoint_key(name)
            if key not in files:
                return None
            if key not in shapes:
                with safe_open(files[key], "pt") as f:
                    piece = f.get_slice(key)
                    shapes[key] = (tuple(piece.get_shape()), piece.get_dtype())
            if shapes[key] != (tuple(tensor.shape), shapes[key][1]) or shapes[key][1] not in FLOAT_DTYPES:
                return None
            out[name] = ("file", files[key], key, load_dtype)
    out.update({name: ("value", value) for name, value in _draw_lora(layers).items()})
    return out


def _local_rows(tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 this rank holds of a sharded tensor (the whole of a replicated one)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return (offset[0], offset[0] + shape[0]) if shape else (0, 0)


def _read(source, handles: dict, stack, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """A source's tensor (rows [start, stop) of it), in the dtype a loaded model has it in."""
    from safetensors import safe_open

    if source[0] == "value":
        value = source[1]
        return value if value.dim() == 0 or start is None else value[start:stop]
    _, path, key, load_dtype = source
    if path not in handles:
        handles[path] = stack.enter_context(safe_open(path, "pt"))
    if start is None:
        return handles[path].get_tensor(key).to(load_dtype)
    piece = handles[path].get_slice(key)
    return piece[start:stop].to(load_dtype)


@torch.no_grad()
def fill(model, plan: dict) -> None:
    """Copy into every (sharded) tensor of `model` its rows from its source."""
    from torch.distributed.tensor import DTensor

    with contextlib.ExitStack() as stack:
        handles = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            sharded = isinstance(tensor, DTensor)
            local = tensor.to_local() if sharded else tensor
            rows = (None, None) if tensor.dim() == 0 else _local_rows(tensor) if sharded else (0, tensor.shape[0])
            local.copy_(_read(plan[name], handles, stack, *rows).to(local.dtype))


@torch.no_grad()
def materialize(model, plan: dict, transform) -> None:
    """Make every tensor of a meta `model` whole on the CPU from its source, one at a time; `transform(module,
    name, tensor)` returns the parameter to keep (NF4 for a quantized weight) or None for a plain one. Tied
    weights stay tied."""
    done: dict[int, torch.nn.Parameter] = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for prefix, module in model.named_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in done:
                    full = f"{prefix}.{name}" if prefix else name
                    value = _read(plan[full], handles, stack)
                    kept = transform(module, name, value)
                    done[id(param)] = (
                        kept
                        if kept is not None
                        else torch.nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
                    )
                    del value
                module._parameters[name] = done[id(param)]
            for name, buf in list(module.named_buffers(recurse=False)):
                full = f"{prefix}.{name}" if prefix else name
                module._buffers[name] = _read(plan[full], handles, stack).to(buf.dtype)
