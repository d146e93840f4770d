"""Advice for a plan that does not fit: the first change that would, in the order a person would try them."""

from __future__ import annotations

import math

from lf_dist.config import RunConfig
from lf_dist.parallel import registry
from lf_dist.parallel.registry import get_backend
from lf_dist.planner import megatron_memory
from lf_dist.planner.plan import method_name
from lf_dist.planner.sizing import Sizing

MIN_SUGGESTED_CUTOFF = 256  # a shorter cutoff_len is no advice for fine-tuning


def suggest(p: Sizing, cfg: RunConfig, method, bits, max_cutoff) -> str:
    """The first change that fits, in the order a person would try them: checkpointing, a lower LoRA rank,
    LoRA, QLoRA (at a lower rank too), a smaller per-device batch with more accumulation, offload, more GPUs of
    the profile's card, a shorter cutoff_len (256 tokens at least); under megatron a larger TP × PP comes first
    after checkpointing. Each is checked with checkpointing on."""
    finetuning_args, training_args = cfg.finetuning, cfg.train
    rank, batch, accum = (
        finetuning_args.lora_rank,
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
    )

    def fits(m, b, **kw):
        mem = p.memory(m, b, True, **kw)
        return mem["total"] if p.fits(mem) else None

    if {
        "disable_gradient_checkpointing",
        "gradient_checkpointing",
    } & cfg.given and finetuning_args.disable_gradient_checkpointing:
        if (total := fits(method, bits)) is not None:
            return f"disable_gradient_checkpointing: false would fit ({total:.2f} GiB)"
    if layout := _megatron_layout(p, method, bits):  # megatron: more model parallelism keeps the method
        return layout
    methods = [(method, bits, "", {})]
    if method in ("full", "freeze"):
        methods.append(("lora", None, "finetuning_type: lora", {}))
    if not bits:
        methods.append(("lora", 4, "finetuning_type: lora with quantization_bit: 4" + _without_deepspeed(p), {}))
        if not get_backend(p.strategy).quantizer:  # a quantized base runs with the default backend
            methods[-1][3].update(strategy=registry.default_backend(p.world), zero_stage=0, offload=False)
    for m, b, what, changes in methods:
        if what and (total := fits(m, b, **changes)) is not None:
            return f"{what} would fit ({total:.2f} GiB)"
        for r in (2**i for i in reversed(range(int(math.log2(max(rank, 1)))))) if m == "lora" else ():
            if (total := fits(m, b, rank=r, **changes)) is not None:
                how = f"{what} and " if what else ""
                return f"{how}lora_rank: {r} would fit with {method_name(m, b)} ({total:.2f} GiB)"
    divisors = [d for d in range(batch - 1, 0, -1) if batch % d == 0]  # the same examples per optimizer step
    for m, b, what, changes in methods:
        for d in divisors:
            if (total := fits(m, b, batch=d, **changes)) is not None:
                how = f"{what} and " if what else ""
                return (
                    f"{how}per_device_train_batch_size: {d} with gradient_accumulation_steps: {accum * batch // d} "
                    f"would fit ({total:.2f} GiB; the same examples per step)"
                )
    return (
        _offload_option(p, method, bits)
        or _more_gpus(p, methods)
        or (f"cutoff_len: {max_cutoff} would fit" if max_cutoff >= MIN_SUGGESTED_CUTOFF else "a smaller model")
    )


def _without_deepspeed(p: Sizing) -> str:
    spec = get_backend(p.strategy)
    if spec.quantizer:
        return ""
    return f" and no {spec.config_key or 'strategy'} config ({spec.shown} takes no quantized base)"


def _megatron_layout(p: Sizing, method, bits) -> str | None:
    """strategy megatron: the smallest TP × PP beyond the config's on which the method fits (full recompute)."""
    if p.parallel is None:
        return None
    now = p.parallel.layout
    for layout in megatron_memory.layouts(p.config, p.world, p.per_node):
        if layout.tp * layout.pp <= now.tp * now.pp:
            continue
        mem = p.with_megatron(layout).memory(method, bits, True)
        if p.fits(mem):
            return (
                f"tensor_model_parallel_size: {layout.tp} and pipeline_model_parallel_size: {layout.pp} would fit "
                f"({mem['total']:.2f} GiB per GPU; DP {layout.dp})"
            )
    return None


def _offload_option(p: Sizing, method, bits) -> str | None:
    """Weights and optimizer states in CPU memory (FSDP2's cpu offload, or DeepSpeed ZeRO-3 offload), checked
    against the node's RAM."""
    if p.offload or not p.hw.on_gpu or p.parallel is not None:  # megatron offloads nothing here
        return None
    if bits and not get_backend(p.strategy).memory.quantized_shards:  # bitsandbytes' weights stay on the device
        return None
    setup, changes = get_backend(p.strategy).offload
    mem = p.memory(method, bits, True, offload=True, **changes)
    if p.fits(mem):
        return f"{setup} would fit ({mem['total']:.2f} GiB per GPU, {mem['host']:.2f} GiB of RAM per node)"
    return None


def _more_gpus(p: Sizing, methods) -> str | None:
    """The smallest count of the profile's card (FSDP2 over them) on which one of the methods fits."""
    if not p.hw.on_gpu:
        return None
    for n in (2**i for i in range(1, 13)):
        for m, b, what, _ in methods if n > p.world else ():
            mem = p.memory(m, b, True, world=n)
            if p.fits(mem):
                nodes = -(-n // p.hw.gpus_per_node)
                where = f"{nodes} nodes of {p.hw.gpus_per_node}" if nodes > 1 else "one node"
                how = f"{what}, " if what else ""
                return (
                    f"{how}{n} × {p.hw.gpu} ({where}, strategy {registry.SCALE_OUT}) would fit "
                    f"({mem['total']:.2f} GiB per GPU)"
                )
    return None
