"""The backend registry: everything that differs between single, ddp, fsdp2 and deepspeed, one spec per backend.

A spec names its Strategy class (imported only when a run uses it), the config it refuses, how it holds a model
in memory (read by the planner's memory model) and, through its strategy, its checkpoint format
(`formats.py`). Adding a backend is adding one spec here; no other module compares a backend's name.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from lf_dist.config.methods import active_methods, distributed_refusal
from lf_dist.errors import UserError
from lf_dist.ports import free_port


@dataclass(frozen=True)
class MemoryTerms:
    """How a backend holds a model, per device, as `planner/memory.py` counts it. `*_from`: the lowest ZeRO stage
    at which that state is sharded over the data-parallel ranks (0: always; None: never)."""

    weights_from: int | None = None
    optimizer_from: int | None = None
    gradients_from: int | None = None
    frozen_bytes: int | None = None  # bytes per frozen weight; None: the compute dtype's
    quantized_shards: bool = False  # 4-bit weights are sharded like the others (NF4 under FSDP2)
    pads_rows: bool = False  # each weight is split by rows, ceil(rows / shards) per rank (FSDP2; ZeRO-3 flattens)
    casts_module: bool = False  # weights and gradients in the compute dtype, fp32 masters in the optimizer
    gradient_copies: int = 1  # DDP keeps a second copy of the gradients in its buckets

    def shards(self, state: str, zero_stage: int = 0) -> bool:
        start = getattr(self, f"{state}_from")
        return start is not None and zero_stage >= start


def _no_sharding_setup(cfg) -> tuple[int, bool]:
    return 0, False


@dataclass(frozen=True)
class BackendSpec:
    name: str
    strategy: str | type  # "module:Class" (imported when a run builds it) or the class itself
    title: str = ""  # how messages spell it (default: the name)
    memory: MemoryTerms = field(default_factory=MemoryTerms)
    one_process: bool = False  # runs in the launching process only, no process group
    # how a quantization_bit base is held: bitsandbytes 4/8-bit on each device ("bitsandbytes"), torchao's NF4
    # sharded like the other weights ("nf4": 4-bit only), or not at all (None)
    quantizer: str | None = "bitsandbytes"
    eight_bit_optim: bool = True  # bitsandbytes' 8-bit AdamW
    fused_optimizer: bool = True  # the planner may pick torch's fused AdamW
    # the profile's rate (ns per trainable value per step, `lf-dist env --calibrate`) of the engine's own work
    # around the optimizer: DeepSpeed's gradient buckets, flat fp32 partitions and copies back
    engine_cost: str | None = None
    config_key: str | None = None  # a train key that only this backend reads (its config file)
    # (ZeRO stage, offload) as the config sets them up for this backend
    sharding: Callable = _no_sharding_setup
    # the ranks one sharded state is split over, of `world` (HSDP: the shard group)
    shard_group: Callable = lambda cfg, world: world
    # what the advice says to offload weights and optimizer states, and the planner changes to price it
    offload: tuple[str, dict] = (
        "deepspeed: examples/deepspeed/ds_z3_offload_config.json",
        {"strategy": "deepspeed", "zero_stage": 3},
    )
    # the backend's own refusals: "module:function" (cfg, world, stage, model_config) → one line or None
    check: str | None = None
    # train keys that only this backend reads ("module:NAME", a dict of key → default)
    own_keys: str | None = None
    # (cfg) → how the config asks for this backend besides `strategy:` (LLaMA-Factory's switches), or None
    switch: str | None = None
    # (cfg, method id of config/methods.py) → why this backend does not run that method (one line), or None
    method_refusal: Callable = lambda cfg, method: None

    @property
    def shown(self) -> str:
        return self.title or self.name

    def load(self) -> type:
        if not isinstance(self.strategy, str):
            return self.strategy
        module, name = self.strategy.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def checkpoint(self):
        """The checkpoint format its strategy writes (`formats.py`)."""
        return self.load().checkpoint_format

    def hook(self, name: str):
        """One of the backend's own functions ("module:function" fields), imported on first use."""
        module, attr = getattr(self, name).split(":")
        return getattr(importlib.import_module(module), attr)

    def refusal(self, cfg, world: int, stage=None, model_config=None) -> str | None:
        """Why this backend cannot run `cfg` on `world` ranks (one line), or None; `stage` and the model's
        `model_config` where the planner has them."""
        if self.one_process and world > 1:
            return f"strategy {self.name}: runs one process, but {world} were launched; use ddp or fsdp2"
        group = self.shard_group(cfg, world)
        if world % group:
            return f"fsdp_shard_size: {group} must divide the world size {world} (whole shard groups of ranks)"
        if cfg.model.quantization_bit and not self.quantizer:
            return f"quantization_bit: not supported with {self.shown} in lf-dist; use fsdp2 (or ddp) or one GPU"
        if cfg.model.quantization_bit and self.quantizer == "nf4":
            if cfg.model.quantization_bit != 4 or cfg.model.quantization_type != "nf4":
                wanted = f"{cfg.model.quantization_bit}-bit {cfg.model.quantization_type}"
                return (
                    f"quantization_bit: {self.shown} shards 4-bit nf4 weights (torchao), not {wanted} "
                    "(bitsandbytes, which does not shard); use quantization_bit: 4 with nf4, or ddp / one GPU"
                )
        if "8bit" in cfg.train.optim and not self.eight_bit_optim:
            runs = ", ".join(n for n, s in BACKENDS.items() if s.eight_bit_optim)
            return f"optim: {cfg.train.optim} runs with strategy {runs.replace(', ', ' or ')}, not {self.name}"
        problem = self._methods_refusal(cfg, world)
        if problem:
            return problem
        return self.hook("check")(cfg, world, stage, model_config) if self.check else None

    def _methods_refusal(self, cfg, world: int) -> str | None:
        problem = distributed_refusal(cfg, world)
        if problem:
            return problem
        for method, key in active_methods(cfg).items():
            why = self.method_refusal(cfg, method)
            if why:
                return f"{key}: not with strategy {self.name} ({why})"
        return None


def _deepspeed_sharding(cfg) -> tuple[int, bool]:
    if not cfg.train.deepspeed:
        return 0, False
    from lf_dist.parallel.deepspeed import read_ds_config

    zero = read_ds_config(cfg.train.deepspeed).get("zero_optimization", {})
    offload = any(
        str((zero.get(k) or {}).get("device", "none")).lower() == "cpu" for k in ("offload_optimizer", "offload_param")
    )
    return int(zero.get("stage", 0)), offload


# the methods that transform whole weight matrices (projections, orthogonalisation) or mask blocks of them
_WHOLE_MATRIX = ("galore", "apollo", "muon")


def _fsdp2_methods(cfg, method: str) -> str | None:
    if method in _WHOLE_MATRIX:
        return "it transforms whole gradient matrices and FSDP2 holds shards of them; use ddp"
    if method == "adam_mini":
        return "Adam-mini partitions whole parameters into its blocks and FSDP2 holds shards of them; use ddp"
    if method == "reentrant_gc":
        return "FSDP2 checkpoints non-reentrantly, as LLaMA-Factory forces under FSDP; drop the key"
    return None


def _deepspeed_methods(cfg, method: str) -> str | None:
    zero = _deepspeed_sharding(cfg)[0]
    if method in _WHOLE_MATRIX:
        return "it transforms whole gradient matrices, which DeepSpeed flattens and partitions; use ddp"
    if method == "badam_layer":
        return "lf-dist runs BAdam's layer mode on one process (its ZeRO-3 path fails with this DeepSpeed)"
    if method == "adam_mini":
        return "DeepSpeed hands the optimizer flat 1-D partitions and Adam-mini's blocks need whole matrices; use ddp"
    if method == "pure_bf16":
        return "DeepSpeed's bf16 mode keeps fp32 master weights; set bf16: true instead"
    if zero == 3 and method in ("pissa", "predict"):
        return "LLaMA-Factory refuses it under ZeRO-3"
    return None


def _megatron_methods(cfg, method: str) -> str | None:
    if method == "reentrant_gc":
        return "megatron-core recomputes activations as its recompute_* keys say"
    return "megatron-core trains with its own optimizer, layers and loss; use fsdp2 or ddp"


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("single", "lf_dist.parallel.single:SingleStrategy", one_process=True),
        BackendSpec(
            "ddp",
            "lf_dist.parallel.distributed:DDPStrategy",
            memory=MemoryTerms(gradient_copies=2),
        ),
        BackendSpec(
            "fsdp2",
            "lf_dist.parallel.fsdp2:FSDP2Strategy",
            # shards of every state: frozen weights in the compute dtype, trainable ones fp32; 4-bit weights NF4
            memory=MemoryTerms(0, 0, 0, quantized_shards=True, pads_rows=True),
            quantizer="nf4",
            eight_bit_optim=False,
            sharding=lambda cfg: (0, bool(cfg.train.fsdp_cpu_offload)),
            shard_group=lambda cfg, world: min(cfg.train.fsdp_shard_size or world, world),
            offload=("fsdp_cpu_offload: true", {}),
            method_refusal=_fsdp2_methods,
        ),
        BackendSpec(
            "deepspeed",
            "lf_dist.parallel.deepspeed:DeepSpeedStrategy",
            "DeepSpeed",
            memory=MemoryTerms(weights_from=3, optimizer_from=1, gradients_from=2, casts_module=True),
            quantizer=None,
            eight_bit_optim=False,
            fused_optimizer=False,
            engine_cost="deepspeed_ns_per_value",
            config_key="deepspeed",
            sharding=_deepspeed_sharding,
            method_refusal=_deepspeed_methods,
        ),
        BackendSpec(
            "megatron",
            "lf_dist.parallel.megatron.strategy:MegatronStrategy",
            "Megatron-core",
            # the planner's megatron memory model (planner/megatron_memory.py) replaces these terms
            memory=MemoryTerms(optimizer_from=1),
            quantizer=None,
            eight_bit_optim=False,
            fused_optimizer=False,
            check="lf_dist.parallel.megatron.settings:refusal",
            own_keys="lf_dist.parallel.megatron.settings:KEYS",
            switch="lf_dist.parallel.megatron.settings:switched_on",
            method_refusal=_megatron_methods,
        ),
    )
}
SCALE_OUT = "fsdp2"  # what runs on more than one rank unless the config says otherwise


def register(spec: BackendSpec) -> None:
    BACKENDS[spec.name] = spec


def get_backend(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise UserError(f"strategy: {name!r} is not one of {', '.join(('auto', *BACKENDS))}")
    return BACKENDS[name]


def check_config(cfg) -> None:
    """The backend keys' values, checked with the rest of the config: a backend's own keys, or its switch, next to
    `strategy` naming another backend are refused rather than ignored."""
    name = cfg.train.strategy
    if name != "auto":
        get_backend(name)
    switched = [(s, s.hook("switch")(cfg)) for s in BACKENDS.values() if s.switch]
    for spec, how in switched:
        if how and name not in ("auto", spec.name):
            raise UserError(f"{how} selects strategy {spec.name}, but strategy is '{name}'; drop one of them")
    for spec in BACKENDS.values():
        if spec.config_key and getattr(cfg.train, spec.config_key) and name not in ("auto", spec.name):
            raise UserError(
                f"{spec.config_key}: a {spec.shown} config is set but strategy is '{name}'; drop one of them"
            )
        own = spec.hook("own_keys") if spec.own_keys else {}
        given = [k for k, default in own.items() if getattr(cfg.train, k) != default]
        chosen = name == spec.name or (name == "auto" and any(s is spec and how for s, how in switched))
        if given and not chosen:
            raise UserError(f"{given[0]}: read by strategy {spec.name} only; set strategy: {spec.name}, or drop it")


def default_backend(world: int) -> str:
    return next(n for n, s in BACKENDS.items() if s.one_process) if world == 1 else SCALE_OUT


def choose(cfg, world: int, stage=None, model_config=None) -> tuple[BackendSpec, str]:
    """The backend of a run on `world` ranks, with the reason; refused in one line where it cannot run it."""
    name = cfg.train.strategy
    keyed = [s for s in BACKENDS.values() if s.config_key and getattr(cfg.train, s.config_key)]
    switched = [(s, how) for s in BACKENDS.values() if s.switch for how in [s.hook("switch")(cfg)] if how]
    if name != "auto":
        spec, why = get_backend(name), f"strategy {name}: as the config says"
    elif switched:
        spec, why = switched[0][0], f"strategy {switched[0][0].name}: {switched[0][1]}"
    elif keyed:
        spec, why = keyed[0], f"strategy {keyed[0].name}: a {keyed[0].shown} config is given"
    elif world == 1:
        spec, why = get_backend(default_backend(1)), f"strategy {default_backend(1)}: one process"
    else:
        spec = get_backend(SCALE_OUT)
        why = f"strategy {SCALE_OUT}: {world} ranks shard weights, gradients and optimizer states"
    problem = spec.refusal(cfg, world, stage, model_config)
    if problem:
        raise UserError(problem)
    return spec, why


def build_strategy(cfg):
    """The strategy the plan chose (`cfg.train.strategy`, decided by the planner, never `auto` here)."""
    if cfg.train.strategy == "auto":
        raise ValueError("strategy auto reached build_strategy: the plan decides the strategy before it")
    spec = get_backend(cfg.train.strategy)
    if not spec.one_process and "RANK" not in os.environ:  # one process without torchrun: a group of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    return spec.load()(cfg)
