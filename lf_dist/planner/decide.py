"""The plan: every decision of a run made once, before launch, with the reasons — launcher, strategy,
fine-tuning method and quantization (with fallback), gradient checkpointing, and whether it fits."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lf_dist.config import RunConfig
from lf_dist.errors import UserError
from lf_dist.launch_env import force_torchrun, int_env, use_ray
from lf_dist.planner import kernels as kernel_choice
from lf_dist.planner.memory import Setup, estimate
from lf_dist.planner.model_size import ModelSize, measure, read_model_config, trainable_params
from lf_dist.planner.profiles import HardwareProfile

CHECKPOINTING_MARGIN = 0.9  # checkpointing stays off only while the run fits in 90% of the memory
PLAN_FILE = "run_plan.json"


@dataclass
class Plan:
    profile: str
    device: str  # cuda | cpu
    launcher: str  # local | torchrun
    world_size: int
    nproc_per_node: int
    strategy: str
    finetuning_type: str
    quantization_bit: int | None
    gradient_checkpointing: bool
    packing: bool
    cutoff_len: int
    num_params: int
    trainable_params: int
    per_gpu_memory_gib: float
    gpu_memory_gib: float
    fits: bool
    max_cutoff_len: int
    memory_gib: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    suggestion: str | None = None
    checkpoint_dir: str | None = None  # where checkpoint-N/ go (output_dir unless Ray storage says otherwise)
    layout: dict = field(default_factory=dict)  # Ray: workers, resources per worker, placement
    # kernels (planner/kernels.py): a flash_attn value, padding-free batches, chunked | liger | none, ...
    attention: str = "auto"
    padding_free: bool = False
    cross_entropy: str = "chunked"
    liger: bool = False
    lean_lora: bool = False
    torch_compile: bool = False
    optim: str = "adamw_torch"

    @property
    def expected_peak_gib(self) -> float:
        """What the run's own peak measure should read: CUDA's allocated peak leaves out the runtime overhead
        (context, allocator slack); a CPU process's peak RSS includes it."""
        runtime = self.memory_gib.get("runtime", 0.0) if self.device == "cuda" else 0.0
        return round(self.per_gpu_memory_gib - runtime, 3)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Plan:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def method(self) -> str:
        return f"{self.quantization_bit}-bit QLoRA" if self.quantization_bit else self.finetuning_type

    def summary(self) -> str:
        fit = "fits" if self.fits else "does NOT fit"
        return (
            f"plan: {self.method()} · {self.strategy} · {self.launcher} ×{self.world_size} · checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'} · {self.per_gpu_memory_gib:.2f} of "
            f"{self.gpu_memory_gib:.2f} GiB per {'GPU' if self.device == 'cuda' else 'process'} ({fit}; "
            f"max cutoff_len {self.max_cutoff_len}) · attention {self.attention} · "
            f"{'padding-free' if self.padding_free else 'packed' if self.packing else 'padded'} batches · "
            f"{self.cross_entropy} cross-entropy{' · liger' if self.liger else ''}"
            f"{' · compiled' if self.torch_compile else ''}"
        )

    def apply(self, cfg: RunConfig) -> RunConfig:
        """Write the plan's decisions into the config the worker and strategies read."""
        cfg.finetuning.finetuning_type = self.finetuning_type
        cfg.model.quantization_bit = self.quantization_bit
        cfg.finetuning.disable_gradient_checkpointing = not self.gradient_checkpointing
        cfg.train.strategy = self.strategy
        cfg.model.flash_attn = self.attention
        cfg.data.padding_free = self.padding_free
        cfg.model.enable_liger_kernel = self.liger
        cfg.finetuning.lean_lora = self.lean_lora
        cfg.train.optim = self.optim
        return cfg


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


def _strategy(cfg: RunConfig, world: int) -> tuple[str, str]:
    name = cfg.train.strategy
    if name == "single" and world > 1:
        raise UserError(f"strategy single: runs one process, but {world} were launched; use ddp or fsdp2")
    if name != "auto":
        chosen, why = name, f"strategy {name}: as the config says"
    elif cfg.train.deepspeed:
        chosen, why = "deepspeed", "strategy deepspeed: a DeepSpeed config is given"
    elif world == 1:
        chosen, why = "single", "strategy single: one process"
    else:
        chosen, why = "fsdp2", f"strategy fsdp2: {world} ranks shard weights, gradients and optimizer states"
    if chosen == "deepspeed" and cfg.model.quantization_bit:
        raise UserError("quantization_bit: not supported with DeepSpeed in lf-dist; use fsdp2 (or ddp) or one GPU")
    if "8bit" in cfg.train.optim and chosen in ("fsdp2", "deepspeed"):
        raise UserError(f"optim: {cfg.train.optim} runs with strategy single or ddp, not {chosen}")
    return chosen, why


def _candidates(cfg: RunConfig) -> list[tuple[str, int | None]]:
    """(method, quantization bits) to try in order: the fallback chain full → lora → 4-bit qlora."""
    f, m = cfg.finetuning, cfg.model
    chain = [("full", None), ("lora", None), ("lora", 4)]
    if f.finetuning_type == "auto":
        return chain
    start = (f.finetuning_type, m.quantization_bit)
    if f.finetuning_type == "freeze" or not f.allow_fallback:
        return [start]
    if start in chain:
        return chain[chain.index(start) :]
    return [start, ("lora", 4)] if start != ("lora", 4) else [start]


def _ds_setup(cfg: RunConfig) -> tuple[int, bool]:
    if not cfg.train.deepspeed:
        return 0, False
    from lf_dist.parallel.deepspeed import read_ds_config

    zero = read_ds_config(cfg.train.deepspeed).get("zero_optimization", {})
    offload = any(
        str((zero.get(k) or {}).get("device", "none")).lower() == "cpu" for k in ("offload_optimizer", "offload_param")
    )
    return int(zero.get("stage", 0)), offload


class _Planner:
    def __init__(self, cfg: RunConfig, hw: HardwareProfile, stage, launching: bool):
        self.cfg, self.hw, self.stage = cfg, hw, stage
        self.config = read_model_config(cfg.model.model_name_or_path, cfg.model.trust_remote_code, cfg.model)
        self.size: ModelSize = measure(self.config, stage.head)
        self.world, self.per_node = _env_world(hw, launching, cfg)
        # a CPU machine's RAM is shared by the processes on it
        self.capacity = hw.gpu_memory_gib if hw.on_gpu else hw.gpu_memory_gib / max(self.per_node, 1)
        self.strategy, self.strategy_reason = _strategy(cfg, self.world)
        self.kernels = kernel_choice.choose(cfg, hw, self.config, stage, self.strategy)
        self.zero_stage, ds_offload = _ds_setup(cfg)
        self.offload = ds_offload or (self.strategy == "fsdp2" and cfg.train.fsdp_cpu_offload)
        self._trainable: dict[str, int] = {}

    def trainable(self, method: str) -> int:
        if method not in self._trainable:
            self._trainable[method] = trainable_params(self.config, self.stage.head, self.cfg, method)
        return self._trainable[method]

    def setup(self, method: str, bits: int | None, checkpointing: bool, cutoff: int, batch: int) -> Setup:
        t = self.cfg.train
        as_run = copy.copy(self.cfg.finetuning)
        as_run.finetuning_type = method
        frozen = self.stage.frozen(_with_finetuning(self.cfg, as_run))
        rows = batch * self.stage.data.sequences
        first_trainable = self.cfg.finetuning.freeze_trainable_layers
        return Setup(
            method=method,
            trainable=self.trainable(method),
            quant_bits=bits,
            double_quant=self.cfg.model.double_quantization,
            compute_bytes=2 if (t.bf16 or t.fp16) else 4,
            strategy=self.strategy,
            zero_stage=self.zero_stage,
            dp=self.world,
            offload=self.offload,
            checkpointing=checkpointing,
            tokens=rows * cutoff,
            frozen_copies=sum(1 for fm in frozen if fm.path is not None),
            frozen_forward=bool(frozen),
            optimizer_bytes=2 if "8bit" in t.optim else 8,
            seq_len=cutoff,
            rows=rows,
            attention_mask=self._builds_mask(),
            chunked_logits=self.kernels.cross_entropy != "none",
            on_cpu=not self.hw.on_gpu,
            graph_layers=first_trainable if method == "freeze" and first_trainable > 0 else None,
            accumulation=t.gradient_accumulation_steps,
            logit_width=self.size.vocab_size if self.stage.head.scores_vocabulary else 1,
        )

    def _builds_mask(self) -> bool:
        """Whether attention gets a 4-D mask: eager always; otherwise only rows whose examples are kept apart
        (neat packing, packed pairs, padding-free) without a separating kernel (`model_inputs`)."""
        k, d = self.kernels, self.cfg.data
        if k.attention == "disabled":
            return True
        packed = bool(d.packing) and self.stage.data.packs
        separated = k.padding_free or (packed and (d.neat_packing or self.stage.data.sequences > 1))
        return separated and k.attention not in kernel_choice.SEPARATING

    def memory(self, method, bits, checkpointing, cutoff=None, batch=None) -> dict:
        cutoff = cutoff or self.cfg.data.cutoff_len
        batch = batch or self.cfg.train.per_device_train_batch_size
        setup = self.setup(method, bits, checkpointing, cutoff, batch)
        return estimate(self.size, setup, self.hw.runtime_overhead_gib)

    def max_cutoff(self, method, bits, checkpointing) -> int:
        upper = self.size.max_positions or 1 << 20
        if self.memory(method, bits, checkpointing, cutoff=1)["total"] > self.capacity:
            return 0
        lo, hi = 1, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (
                (mid, hi)
                if self.memory(method, bits, checkpointing, cutoff=mid)["total"] <= self.capacity
                else (lo, mid - 1)
            )
        return lo


def _with_finetuning(cfg: RunConfig, finetuning) -> RunConfig:
    out = copy.copy(cfg)
    out.finetuning = finetuning
    return out


def _name(method: str, bits: int | None) -> str:
    return f"{bits}-bit QLoRA" if bits else method


def make_plan(cfg: RunConfig, hw: HardwareProfile, stage, launching: bool = True) -> Plan:
    """Decide the run for `hw`; `launching` reads torchrun's launch variables (this machine, not a profile)."""
    p = _Planner(cfg, hw, stage, launching)
    reasons = [
        f"model: {p.size.num_params:,} parameters ({cfg.model.model_name_or_path}), {p.size.num_layers} layers, "
        f"vocabulary {p.size.vocab_size:,}",
        p.strategy_reason,
    ]
    gc_given = {"disable_gradient_checkpointing", "gradient_checkpointing"} & cfg.given
    gc_options = [not cfg.finetuning.disable_gradient_checkpointing] if gc_given else [False, True]
    tried, chosen = [], None
    for method, bits in _candidates(cfg):
        if bits and p.strategy == "deepspeed":  # quantized bases run under single, ddp and fsdp2
            continue
        for gc in gc_options:
            mem = p.memory(method, bits, gc)
            limit = p.capacity * (CHECKPOINTING_MARGIN if (not gc and not gc_given and len(gc_options) > 1) else 1.0)
            if mem["total"] <= limit:
                chosen = (method, bits, gc, mem)
                break
        if chosen:
            break
        tried.append((method, bits, mem))
    for method, bits, mem in tried:
        reasons.append(f"{_name(method, bits)} needs {mem['total']:.2f} GiB per device > {p.capacity:.2f} GiB")
    fits = chosen is not None
    if not fits:  # report the last method tried, with checkpointing as it would run
        method, bits, mem = tried[-1]
        chosen = (method, bits, gc_options[-1], mem)
    method, bits, gc, mem = chosen
    if fits:
        reasons.append(f"{_name(method, bits)} fits: {mem['total']:.2f} of {p.capacity:.2f} GiB per device")
    if gc_given:
        reasons.append(f"gradient checkpointing {'on' if gc else 'off'}: as the config says")
    elif not gc:
        reasons.append(
            f"gradient checkpointing off: the run fits within {CHECKPOINTING_MARGIN:.0%} of memory without it "
            "(recomputing every layer would cost about a third more compute)"
        )
    else:
        off = p.memory(method, bits, False)["total"]
        reasons.append(
            f"gradient checkpointing on: without it {off:.2f} GiB > {CHECKPOINTING_MARGIN:.0%} of {p.capacity:.2f} GiB"
        )
    if cfg.finetuning.finetuning_type == "freeze" and cfg.finetuning.allow_fallback:
        reasons.append("freeze is kept as the config says: the fallback walks full → lora → qlora only")
    max_cutoff = p.max_cutoff(method, bits, gc if gc_given else True)
    reasons.append(f"packing {'on' if cfg.data.packing else 'off'}; longest cutoff_len that fits: {max_cutoff}")
    reasons += p.kernels.reasons
    lean, why = kernel_choice.lean_lora(cfg, method, bits)
    if why:
        reasons.append(why)
    layout, checkpoint_dir = {}, None
    if wants_ray(cfg):
        la = cfg.launch
        launcher = "ray"
        layout = {
            "workers": la.ray_num_workers,
            "resources_per_worker": ray_resources(cfg, hw),
            "placement_strategy": la.placement_strategy,
        }
        if la.ray_storage_path and la.ray_run_name:
            checkpoint_dir = str(Path(la.ray_storage_path) / la.ray_run_name)
        reasons.insert(
            1,
            f"launcher ray: {la.ray_num_workers} Ray Train worker(s) × {layout['resources_per_worker']}, placement "
            f"{la.placement_strategy}; checkpoints in {checkpoint_dir or cfg.train.output_dir}",
        )
    else:
        launcher = "torchrun" if p.world > 1 or force_torchrun() else "local"
        reasons.insert(1, f"launcher {launcher}: {p.world} process(es)")
    plan = Plan(
        profile=hw.name,
        device="cuda" if hw.on_gpu else "cpu",
        launcher=launcher,
        world_size=p.world,
        nproc_per_node=p.per_node,
        strategy=p.strategy,
        finetuning_type=method,
        quantization_bit=bits,
        gradient_checkpointing=gc,
        packing=bool(cfg.data.packing),
        cutoff_len=cfg.data.cutoff_len,
        num_params=p.size.num_params,
        trainable_params=p.trainable(method),
        per_gpu_memory_gib=mem["total"],
        gpu_memory_gib=round(p.capacity, 3),
        fits=fits,
        max_cutoff_len=max_cutoff,
        memory_gib=mem,
        reasons=reasons,
        checkpoint_dir=checkpoint_dir,
        layout=layout,
        attention=p.kernels.attention,
        padding_free=p.kernels.padding_free,
        cross_entropy=p.kernels.cross_entropy,
        liger=p.kernels.liger,
        lean_lora=lean,
        torch_compile=p.kernels.torch_compile,
        optim=p.kernels.optim,
    )
    if not fits:
        plan.suggestion = _suggest(p, cfg, method, bits, gc_given, max_cutoff)
        as_run = copy.copy(cfg.finetuning)
        as_run.finetuning_type = method
        copies = [fm for fm in stage.frozen(_with_finetuning(cfg, as_run)) if fm.path is not None]
        if cfg.finetuning.finetuning_type == "auto" and copies:
            raise UserError(
                f"finetuning_type auto: stage {stage.name} needs a frozen {copies[0].role} model ({copies[0].path}) "
                f"next to the policy, and no method fits both on {hw.name} ({mem['total']:.2f} GiB > "
                f"{p.capacity:.2f} GiB); drop ref_model to use the adapters-off base as reference, or plan for "
                "more GPUs"
            )
    return plan


def _suggest(p: _Planner, cfg: RunConfig, method, bits, gc_given, max_cutoff) -> str | None:
    """The first change that would fit."""
    batch = cfg.train.per_device_train_batch_size
    options = []
    if gc_given and cfg.finetuning.disable_gradient_checkpointing:
        options.append(("disable_gradient_checkpointing: false", (method, bits, True, None, None)))
    if method in ("full", "freeze"):
        options.append(("finetuning_type: lora", ("lora", None, True, None, None)))
    if not bits:
        options.append(("finetuning_type: lora with quantization_bit: 4", ("lora", 4, True, None, None)))
    if batch > 1:
        options.append(("per_device_train_batch_size: 1", (method, bits, True, None, 1)))
    for text, (m, b, gc, cutoff, bs) in options:
        total = p.memory(m, b, gc, cutoff, bs)["total"]
        if total <= p.capacity:
            return f"{text} would fit ({total:.2f} GiB)"
    if max_cutoff > 0:
        return f"cutoff_len: {max_cutoff} would fit"
    return "more GPUs, or a smaller model"


def require_fit(plan: Plan) -> None:
    """`lf-dist train` refuses a plan that cannot fit, before anything is loaded."""
    if plan.fits:
        return
    raise UserError(
        f"plan: {plan.method()} needs {plan.per_gpu_memory_gib:.2f} GiB per device, {plan.profile} has "
        f"{plan.gpu_memory_gib:.2f} GiB; {plan.suggestion or 'no change found that fits'} "
        "(see `lf-dist plan`, or set finetuning_type: auto)"
    )
