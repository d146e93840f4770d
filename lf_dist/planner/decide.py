"""The plan: every decision of a run made once, before launch, with the reasons — launcher, strategy,
fine-tuning method and quantization (with fallback), gradient checkpointing, and whether it fits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lf_dist.config import RunConfig
from lf_dist.env_contract import force_torchrun, int_env, use_ray
from lf_dist.errors import UserError
from lf_dist.parallel import registry
from lf_dist.parallel.registry import get_backend
from lf_dist.planner import kernel_choice, megatron_memory
from lf_dist.planner.advice import suggest
from lf_dist.planner.model_size import read_model_config
from lf_dist.planner.plan import Plan, method_name
from lf_dist.planner.profiles import HardwareProfile
from lf_dist.planner.sizing import HOST_MARGIN, Sizing, with_method

CHECKPOINTING_MARGIN = 0.9  # checkpointing stays off only while the run fits in 90% of the memory


def wants_ray(cfg: RunConfig) -> bool:
    return cfg.launch.launcher == "ray" or (cfg.launch.launcher == "auto" and use_ray())


def ray_resources(cfg: RunConfig, hw: HardwareProfile) -> dict:
    return dict(cfg.launch.resources_per_worker or ({"GPU": 1} if hw.on_gpu else {"CPU": 1}))


def _env_world(hw: HardwareProfile, launching: bool, cfg: RunConfig) -> tuple[int, int]:
    """(world size, processes per node): the Ray workers asked for; torchrun's own variables inside a rank;
    the launch contract (NPROC_PER_NODE, NNODES) for this machine; the profile for a machine you do not have."""
    if wants_ray(cfg):  # Ray places the workers; on one machine they share its RAM
        return cfg.launch.ray_num_workers, cfg.launch.ray_num_workers if not hw.on_gpu else hw.devices_per_node
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if launching:
        per_node = int_env("NPROC_PER_NODE", hw.devices_per_node)
        return per_node * int_env("NNODES", hw.nnodes), per_node
    return hw.world_size, hw.devices_per_node


def _candidates(cfg: RunConfig) -> list[tuple[str, int | None]]:
    """(method, quantization bits) to try in order: the fallback chain full → lora → 4-bit qlora."""
    finetuning_args, model_args = cfg.finetuning, cfg.model
    chain = [("full", None), ("lora", None), ("lora", 4)]
    if finetuning_args.finetuning_type == "auto":
        return chain
    start = (finetuning_args.finetuning_type, model_args.quantization_bit)
    if finetuning_args.finetuning_type == "freeze" or not finetuning_args.allow_fallback:
        return [start]
    if finetuning_args.finetuning_type == "oft":  # OFT stays OFT: its one step down is a 4-bit base
        return [start, ("oft", 4)] if start[1] is None else [start]
    if start in chain:
        return chain[chain.index(start) :]
    return [start, ("lora", 4)] if start != ("lora", 4) else [start]


@dataclass
class Choice:
    """What the search settled on: the method, its quantization, checkpointing and memory, and whether it fits."""

    method: str
    bits: int | None
    checkpointing: bool
    memory: dict
    fits: bool
    given_checkpointing: bool  # the config set checkpointing: the search kept it
    reasons: list = field(default_factory=list)


def search(cfg: RunConfig, p: Sizing, backend, candidates: list | None = None) -> Choice:
    """The first method of the fallback chain (or of `candidates`) that fits, with checkpointing off while it fits
    within the margin; the reasons for every method passed over."""
    gc_options, gc_given = p.checkpointing_options()
    tried, chosen = [], None
    for method, bits in candidates or _candidates(cfg):
        if bits and not backend.quantizer:
            continue
        for gc in gc_options:
            mem = p.memory(method, bits, gc)
            limit = p.capacity * (CHECKPOINTING_MARGIN if (not gc and not gc_given and len(gc_options) > 1) else 1.0)
            if p.fits(mem, limit):
                chosen = Choice(method, bits, gc, mem, True, gc_given)
                break
        if chosen:
            break
        tried.append((method, bits, mem))
    if chosen is None:  # report the last method tried, with checkpointing as it would run
        method, bits, mem = tried[-1]
        chosen = Choice(method, bits, gc_options[-1], mem, False, gc_given)
    for method, bits, mem in tried:
        if mem["total"] > p.capacity:
            why = f"needs {mem['total']:.2f} GiB per device > {p.capacity:.2f} GiB"
        else:
            why = (
                f"fits the device ({mem['total']:.2f} GiB) but what it offloads needs {mem['host']:.2f} GiB of RAM "
                f"per node > {HOST_MARGIN:.0%} of {p.hw.ram_gib:.0f} GiB"
            )
        chosen.reasons.append(f"{method_name(method, bits)} {why}")
    return chosen


def _checkpointing_reason(p: Sizing, c: Choice) -> str:
    if p.parallel is not None:
        return _recompute_reason(p, c)
    if c.given_checkpointing:
        return f"gradient checkpointing {'on' if c.checkpointing else 'off'}: as the config says"
    if not c.checkpointing:
        return (
            f"gradient checkpointing off: the run fits within {CHECKPOINTING_MARGIN:.0%} of memory without it "
            "(recomputing every layer would cost about a third more compute)"
        )
    off = p.memory(c.method, c.bits, False)["total"]
    return f"gradient checkpointing on: without it {off:.2f} GiB > {CHECKPOINTING_MARGIN:.0%} of {p.capacity:.2f} GiB"


def _recompute_reason(p: Sizing, c: Choice) -> str:
    what = p.parallel.with_recompute(c.checkpointing, p.cfg).describe_recompute()
    if c.given_checkpointing:
        return f"{what}: as the config says"
    if not c.checkpointing:
        return f"{what}: the run fits within {CHECKPOINTING_MARGIN:.0%} of memory without it"
    off = p.memory(c.method, c.bits, False)["total"]
    why = f"without recompute {off:.2f} GiB > {CHECKPOINTING_MARGIN:.0%} of {p.capacity:.2f} GiB"
    if c.checkpointing == "full":
        why += f", with selective {p.memory(c.method, c.bits, 'selective')['total']:.2f} GiB"
    return f"{what}: {why}"


def launch_layout(cfg: RunConfig, hw: HardwareProfile, world: int) -> tuple[str, dict, str | None, str]:
    """(launcher, Ray's worker layout, the checkpoint folder when not output_dir, the reason)."""
    if not wants_ray(cfg):
        launcher = "torchrun" if world > 1 or force_torchrun() else "local"
        return launcher, {}, None, f"launcher {launcher}: {world} process(es)"
    launch_args, checkpoint_dir = cfg.launch, None
    layout = {
        "workers": launch_args.ray_num_workers,
        "resources_per_worker": ray_resources(cfg, hw),
        "placement_strategy": launch_args.placement_strategy,
    }
    if launch_args.ray_storage_path and launch_args.ray_run_name:
        checkpoint_dir = str(Path(launch_args.ray_storage_path) / launch_args.ray_run_name)
    why = (
        f"launcher ray: {launch_args.ray_num_workers} Ray Train worker(s) × {layout['resources_per_worker']}, "
        f"placement {launch_args.placement_strategy}; checkpoints in {checkpoint_dir or cfg.train.output_dir}"
    )
    return "ray", layout, checkpoint_dir, why


def make_plan(cfg: RunConfig, hw: HardwareProfile, stage, launching: bool = True) -> Plan:
    """Decide the run for `hw`; `launching` reads torchrun's launch variables (this machine, not a profile)."""
    _check_fp8(cfg, hw, launching)
    world, per_node = _env_world(hw, launching, cfg)
    model_config = read_model_config(cfg.model.model_name_or_path, cfg.model.trust_remote_code, cfg.model)
    backend, strategy_reason = _backend(cfg, hw, world, stage, model_config, launching)
    zero_stage, offload = backend.sharding(cfg)
    p = Sizing(cfg, hw, stage, world, per_node, backend.name, zero_stage, offload)
    choice = search(cfg, p, backend)
    strategy_reasons = [strategy_reason]
    if cfg.train.strategy == "auto" and backend.name == registry.SCALE_OUT and hw.on_gpu and not p.offload:
        p, choice, strategy_reasons = _megatron_where_fsdp2_falls_short(cfg, p, choice, strategy_reason)
    launcher, layout, checkpoint_dir, launch_reason = launch_layout(cfg, hw, p.world)
    plan = record(cfg, p, choice, launcher, layout, checkpoint_dir, [launch_reason, *strategy_reasons])
    if not choice.fits:
        plan.suggestion = suggest(p, cfg, choice.method, choice.bits, plan.max_cutoff_len)
        copies = [fm for fm in stage.frozen(with_method(cfg, choice.method)) if fm.path is not None]
        if cfg.finetuning.finetuning_type == "auto" and copies:
            raise UserError(
                f"finetuning_type auto: stage {stage.name} needs a frozen {copies[0].role} model ({copies[0].path}) "
                f"next to the policy, and no method fits both on {hw.name} ({choice.memory['total']:.2f} GiB > "
                f"{p.capacity:.2f} GiB); drop ref_model to use the adapters-off base as reference, or plan for "
                "more GPUs"
            )
    return plan


def _check_fp8(cfg: RunConfig, hw: HardwareProfile, launching: bool) -> None:
    """fp8 needs float8 tensor cores: refused on a CPU profile, and on this machine when it lacks them."""
    if not cfg.train.fp8:
        return
    from lf_dist.kernels import float8

    why = float8.supported_here() if launching else (None if hw.on_gpu else "needs CUDA GPUs; this profile has none")
    if why:
        raise UserError(f"fp8: float8 training {why}; drop fp8 (bf16 trains the same model)")


def _backend(cfg: RunConfig, hw: HardwareProfile, world: int, stage, model_config, launching: bool):
    """The registry's backend and why; megatron planned for a GPU profile on another machine is checked without
    its CUDA refusal (the profile's machine has CUDA)."""
    spec = megatron_memory.megatron_backend()
    asked = cfg.train.strategy == spec.name or (cfg.train.strategy == "auto" and spec.hook("switch")(cfg))
    if launching or not hw.on_gpu or not asked:
        return registry.choose(cfg, world, stage, model_config)
    problem = megatron_memory.refusal(cfg, world, stage, model_config)
    if problem:
        raise UserError(problem)
    how = "as the config says" if cfg.train.strategy == spec.name else spec.hook("switch")(cfg)
    return spec, f"strategy {spec.name}: {how}"


def _megatron_where_fsdp2_falls_short(cfg: RunConfig, p: Sizing, fsdp2: Choice, strategy_reason: str):
    """strategy auto on GPUs: where FSDP2 fits no method, or only one later in the fallback chain, megatron is
    priced over its layouts (smallest TP·PP first) and chosen where one fits a method FSDP2 could not; (the sizing,
    the choice, the strategy's reason lines), each backend's figures on a line of its own."""
    chain = _candidates(cfg)
    if p.world < 2 or (fsdp2.fits and (fsdp2.method, fsdp2.bits) == chain[0]):
        return p, fsdp2, [strategy_reason]
    name = megatron_memory.megatron_backend().name
    lost = p.memory(*chain[0], fsdp2.checkpointing if fsdp2.given_checkpointing else True)
    lines = [
        f"{registry.SCALE_OUT}: {method_name(*chain[0])} needs {lost['total']:.2f} GiB per GPU > {p.capacity:.2f} "
        f"GiB ({megatron_memory.figures(lost)})"
    ]
    methods, refused = _megatron_methods(cfg, p, chain)
    if not methods:
        return p, fsdp2, [strategy_reason, *lines, f"{name}: not priced: {refused}"]
    best, least = _megatron_layouts(cfg, p, methods)
    if least is None:
        return p, fsdp2, [strategy_reason, *lines, f"{name}: no TP × PP splits this model over {p.world} GPUs"]
    rank = {c: i for i, c in enumerate(chain)}
    if best is None or (fsdp2.fits and rank[(best[1].method, best[1].bits)] >= rank[(fsdp2.method, fsdp2.bits)]):
        also = f" (it fits {method_name(fsdp2.method, fsdp2.bits)} too)" if fsdp2.fits else ""
        return p, fsdp2, [strategy_reason, *lines, _priced(*(best or least), f"; {registry.SCALE_OUT} stays{also}")]
    q, c = best
    why = f"strategy {name}: {registry.SCALE_OUT} does not fit {method_name(c.method, c.bits)} on {p.world} GPUs"
    why += "; tensor and pipeline parallelism split the layers and their activations"
    return q, c, [why, *lines, _priced(q, c, ", the smallest TP × PP that does")]


def _priced(q: Sizing, c: Choice, tail: str) -> str:
    """One reason line: megatron's layout and its figures."""
    lay, mem = q.parallel.layout, c.memory
    verdict = "fits in" if c.fits else "needs"
    return (
        f"{q.strategy} TP {lay.tp} × PP {lay.pp} × DP {lay.dp}: {method_name(c.method, c.bits)} {verdict} "
        f"{mem['total']:.2f} of {q.capacity:.2f} GiB per GPU ({megatron_memory.figures(mem)}){tail}"
    )


def _megatron_methods(cfg: RunConfig, p: Sizing, chain: list) -> tuple[list, str | None]:
    """The methods of the fallback chain megatron can train (no quantized base), and the first refusal."""
    methods, refused = [], None
    for method, bits in chain:
        problem = "quantization_bit: megatron trains bf16/fp32 weights" if bits else None
        problem = problem or megatron_memory.refusal(with_method(cfg, method), p.world, p.stage, p.config)
        if problem is None:
            methods.append((method, bits))
        refused = refused or problem
    return methods, refused


def _megatron_layouts(cfg: RunConfig, p: Sizing, methods: list):
    """((sizing, choice) of the first layout that fits the earliest method, or None; (sizing, choice) of the layout
    that needs the least memory, or None where no layout splits the model)."""
    spec, best, least = megatron_memory.megatron_backend(), None, None
    for layout in megatron_memory.layouts(p.config, p.world, p.per_node):
        q = p.with_megatron(layout)
        c = search(cfg, q, spec, methods)
        earlier = best is None or methods.index((c.method, c.bits)) < methods.index((best[1].method, best[1].bits))
        if c.fits and earlier:
            best = (q, c)
        if least is None or c.memory["total"] < least[1].memory["total"]:
            least = (q, c)
        if best and (best[1].method, best[1].bits) == methods[0]:
            break  # a later layout is larger and fits no earlier method
    return best, least


def record(cfg: RunConfig, p: Sizing, c: Choice, launcher, layout, checkpoint_dir, launch_reasons) -> Plan:
    """The Plan of a choice: every decision and the most that fits, with the reasons in the order they are read."""
    size, mem = p.size, c.memory
    reasons = [
        f"model: {size.num_params:,} parameters ({cfg.model.model_name_or_path}), {size.num_layers} layers, "
        f"vocabulary {size.vocab_size:,}",
        *launch_reasons,
        *c.reasons,
    ]
    if c.fits:
        reasons.append(f"{method_name(c.method, c.bits)} fits: {mem['total']:.2f} of {p.capacity:.2f} GiB per device")
    unquantized = {}
    if c.bits:
        unquantized, why = _quantization(p, c)
        reasons.append(why)
    reasons.append(_checkpointing_reason(p, c))
    if cfg.finetuning.finetuning_type == "freeze" and cfg.finetuning.allow_fallback:
        reasons.append("freeze is kept as the config says: the fallback walks full → lora → qlora only")
    most_gc = c.checkpointing if c.given_checkpointing else True  # checkpointing on where it must be
    max_cutoff = p.max_cutoff(c.method, c.bits, most_gc)
    parallel = p.parallel.with_recompute(c.checkpointing, cfg) if p.parallel else None
    packing, lean, more = _rows_and_kernels(cfg, p, c, max_cutoff, parallel)
    reasons += more
    k = p.kernels
    return Plan(
        profile=p.hw.name,
        device="cuda" if p.hw.on_gpu else "cpu",
        launcher=launcher,
        world_size=p.world,
        nproc_per_node=p.per_node,
        strategy=p.strategy,
        finetuning_type=c.method,
        quantization_bit=c.bits,
        gradient_checkpointing=bool(c.checkpointing),
        packing=packing,
        cutoff_len=cfg.data.cutoff_len,
        num_params=size.num_params,
        trainable_params=p.trainable(c.method),
        per_gpu_memory_gib=mem["total"],
        gpu_memory_gib=round(p.capacity, 3),
        fits=c.fits,
        max_cutoff_len=max_cutoff,
        memory_gib={key: v for key, v in mem.items() if key != "host"},
        max_lora_rank=p.max_rank(c.method, c.bits, most_gc),
        max_batch_size=p.max_batch(c.method, c.bits, most_gc),
        host_memory_gib=mem["host"],
        reasons=reasons,
        checkpoint_dir=checkpoint_dir,
        layout=layout,
        attention=k.attention,
        padding_free=k.padding_free,
        cross_entropy=k.cross_entropy,
        liger=k.liger,
        lean_lora=lean,
        torch_compile=k.torch_compile,
        optim=k.optim,
        unquantized_layers=unquantized,
        model_parallel=parallel.record(cfg) if parallel else {},
        step_time=p.step_time(c.method, c.bits, c.checkpointing).to_dict(),
    )


def _rows_and_kernels(cfg: RunConfig, p: Sizing, c: Choice, max_cutoff: int, parallel) -> tuple[bool, bool, list]:
    """(packing, lean LoRA, the reasons for them, for what is offloaded, megatron's layout and the kernels)."""
    packing = p.packing()
    why = " (megatron packs rows when asked, on Transformer Engine)" if parallel and not packing else ""
    reasons = [f"packing {'on' if packing else 'off'}{why}; longest cutoff_len that fits: {max_cutoff}"]
    if p.offload:
        reasons.append(f"offloaded to CPU memory: {c.memory['host']:.2f} GiB per node of {p.hw.ram_gib:.0f} GiB RAM")
    if parallel:
        reasons.append(parallel.layout.describe(cfg))
    lean, why = kernel_choice.lean_lora(cfg, c.method, c.bits) if not parallel else (False, None)
    return packing, lean, reasons + p.kernels.reasons + ([why] if why else [])


def _quantization(p: Sizing, c: Choice) -> tuple[dict, str]:
    """How the 4/8-bit base is held, and (NF4) the decoder linear layers that stay in the compute dtype."""
    backend = get_backend(p.strategy)
    if backend.quantizer != "nf4":
        return {}, f"{c.bits}-bit base: bitsandbytes, whole on every device"
    shards = p.setup(c.method, c.bits, c.checkpointing, p.cfg.data.cutoff_len, 1).dp
    quantized, kept = p.size.nf4_split(shards)
    share = quantized / max(p.size.quantizable_params, 1)
    why = f"4-bit base: torchao NF4 sharded over {shards} rank(s), {share:.0%} of the decoder's linear weights"
    if kept:
        why += "; unquantized (blocks do not split): " + ", ".join(f"{n} ×{k}" for n, k in kept.items())
    return kept, why
