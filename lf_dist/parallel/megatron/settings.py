"""The megatron keys of a config: the parallel layout of a world, and what a run cannot do (one line each).

Read when the run is planned, before anything starts; nothing here imports megatron-core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lf_dist.errors import UserError
from lf_dist.parallel.megatron import runtime

# the train keys only strategy megatron reads, with their defaults (schema.TrainArgs)
KEYS = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "sequence_parallel": False,
    "context_parallel_size": 1,
    "use_distributed_optimizer": None,
    "overlap_grad_reduce": False,
    "overlap_param_gather": False,
    "recompute_granularity": None,
    "recompute_method": None,
    "recompute_num_layers": None,
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def switched_on(cfg) -> str | None:
    """How the config or the environment asks for megatron as LLaMA-Factory spells it, or None."""
    for key in ("use_mca", "use_megatron_bridge"):
        if getattr(cfg.train, key):
            return f"{key}: true"
    for name in ("USE_MCA", "USE_MEGATRON_BRIDGE"):
        if _env_flag(name):
            return f"{name}=1"
    return None


def keys_set(cfg) -> list[str]:
    """The megatron keys this config sets to something other than their defaults."""
    return [key for key, default in KEYS.items() if getattr(cfg.train, key) != default]


@dataclass(frozen=True)
class Layout:
    """How a world of ranks is split: tensor × pipeline (× virtual stages) × context × data parallel."""

    tp: int
    pp: int
    vpp: int | None
    cp: int
    dp: int

    @classmethod
    def of(cls, cfg, world: int) -> Layout:
        t = cfg.train
        tp, pp, cp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size
        vpp = t.virtual_pipeline_model_parallel_size if (t.virtual_pipeline_model_parallel_size or 1) > 1 else None
        return cls(tp, pp, vpp, cp, max(world // (tp * pp * cp), 1))

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def describe(self, cfg) -> str:
        """The layout and the global batch, which differs from the data-parallel backends' for the same YAML."""
        t = cfg.train
        batch = self.dp * t.per_device_train_batch_size * t.gradient_accumulation_steps
        vpp = f" × {self.vpp} virtual stages" if self.vpp else ""
        return (
            f"megatron: {self.dp * self.model_parallel} rank(s) = TP {self.tp} × PP {self.pp}{vpp} × CP {self.cp} × "
            f"DP {self.dp}; global batch = DP {self.dp} × per_device_train_batch_size "
            f"{t.per_device_train_batch_size} × gradient_accumulation_steps {t.gradient_accumulation_steps} = "
            f"{batch} sequences per step (the data-parallel backends would take {self.dp * self.model_parallel} × "
            f"{t.per_device_train_batch_size} × {t.gradient_accumulation_steps})"
        )


def distributed_optimizer(cfg, layout: Layout) -> bool:
    """`use_distributed_optimizer`, with its default: on with CUDA and more than one data-parallel rank."""
    chosen = cfg.train.use_distributed_optimizer
    return bool(chosen) if chosen is not None else runtime.has_cuda() and layout.dp > 1


def refusal(cfg, world: int, stage=None, model_config=None, layout: Layout | None = None, cuda=None) -> str | None:
    """Why strategy megatron cannot run `cfg` on `world` ranks, in one line; None where it can. `stage` (its
    StageSpec) and `model_config` (the Hugging Face config, split over `layout`, the config's by default) are checked
    where the planner passes them; `cuda` True prices a GPU machine from another one (its device checks are
    skipped), None checks this machine."""
    checks = (_layout_refusal, _method_refusal, _transformer_engine_refusal)
    for check in checks if cuda else (_layout_refusal, _device_refusal, *checks[1:]):
        try:
            problem = check(cfg, world, stage)
        except UserError as err:  # lora_target's own refusal
            problem = str(err)
        if problem:
            return problem
    if model_config is not None:
        from lf_dist.parallel.megatron.model_map import check_model

        layout = layout or Layout.of(cfg, world)
        return check_model(model_config, layout.tp, layout.pp, layout.vpp)
    return None


def _layout_refusal(cfg, world: int, stage) -> str | None:
    layout = Layout.of(cfg, world)
    if world % layout.model_parallel:
        return (
            f"tensor_model_parallel_size {layout.tp} × pipeline_model_parallel_size {layout.pp} × "
            f"context_parallel_size {layout.cp} = {layout.model_parallel} must divide the world size {world} (the "
            "rest is data parallel)"
        )
    accumulation = cfg.train.gradient_accumulation_steps
    if layout.vpp and accumulation % layout.pp:
        return (
            f"gradient_accumulation_steps {accumulation}: megatron-core's interleaved pipeline "
            f"(virtual_pipeline_model_parallel_size) runs micro-batches in groups of pipeline_model_parallel_size "
            f"{layout.pp}; make it a multiple of {layout.pp}"
        )
    return None


def _device_refusal(cfg, world: int, stage) -> str | None:
    """What this machine cannot run, refused rather than dropped."""
    if runtime.device() is None:
        return (
            "strategy megatron: megatron-core's layers need CUDA GPUs and this machine has none; use strategy "
            "fsdp2 (or deepspeed) here"
        )
    if cfg.train.use_distributed_optimizer and not runtime.has_cuda():
        return "use_distributed_optimizer: megatron-core's distributed optimizer needs CUDA; set it to false here"
    return None


def _transformer_engine_refusal(cfg, world: int, stage) -> str | None:
    """What megatron-core runs on Transformer Engine's layers only (checked on the machine that plans)."""
    t, data = cfg.train, cfg.data
    if runtime.has_transformer_engine():
        return None
    needs_te = {
        "sequence_parallel": t.sequence_parallel,
        "context_parallel_size": t.context_parallel_size > 1,
        # asked for: a stage's own default (pt packs) is turned off by the plan instead
        "packing": ("packing" in cfg.given and bool(data.packing)) or bool(data.neat_packing),
        "padding_free": "padding_free" in cfg.given and bool(data.padding_free),
    }
    for key, asked in needs_te.items():
        if asked:
            return (
                f"{key}: strategy megatron runs it on Transformer Engine's layers, which are not installed "
                "(pip install transformer-engine[pytorch]); turn it off, or install Transformer Engine"
            )
    return None


def _method_refusal(cfg, world: int, stage) -> str | None:
    finetuning, model = cfg.finetuning, cfg.model
    if stage is not None and not stage.token_loss:
        return (
            f"stage {stage.name}: strategy megatron trains stages pt and sft (a token cross-entropy); use fsdp2 "
            "(or deepspeed) for this stage"
        )
    if cfg.train.fp16:
        return "fp16: strategy megatron trains in bf16 or fp32; use bf16: true"
    if finetuning.finetuning_type not in ("full", "lora", "auto"):
        return f"finetuning_type {finetuning.finetuning_type}: strategy megatron trains full or lora"
    if model.quantization_bit:
        return "quantization_bit: strategy megatron trains bf16/fp32 weights; use fsdp2 for QLoRA"
    if finetuning.finetuning_type == "lora":
        from lf_dist.parallel.megatron.lora import megatron_lora_targets

        megatron_lora_targets(finetuning.lora_target)  # raises, naming the fused groups
        unsupported = [k for k in ("use_dora", "pissa_init", "loraplus_lr_ratio") if getattr(finetuning, k, None)]
        if unsupported:
            return f"{unsupported[0]}: not supported with strategy megatron; drop it or use fsdp2"
    return None
