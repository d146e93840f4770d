"""The Plan: every decision of a run, made once before launch, with the reasons; what launchers and workers read."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lf_dist.config import RunConfig
from lf_dist.errors import UserError

PLAN_FILE = "run_plan.json"


def method_name(method: str, bits: int | None) -> str:
    if not bits:
        return method
    return f"{bits}-bit QLoRA" if method == "lora" else f"{method} on a {bits}-bit base"


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
    # the most that fits with the chosen method, each with the other settings as configured (0: none fits)
    max_lora_rank: int | None = None  # a power of two; None for methods without LoRA
    max_batch_size: int = 0  # per_device_train_batch_size
    host_memory_gib: float = 0.0  # per node, for what is offloaded to CPU memory (weights, optimizer states)
    reasons: list = field(default_factory=list)
    suggestion: str | None = None
    checkpoint_dir: str | None = None  # where checkpoint-N/ go (output_dir unless Ray storage says otherwise)
    layout: dict = field(default_factory=dict)  # Ray: workers, resources per worker, placement
    # kernels (planner/kernel_choice.py): a flash_attn value, padding-free batches, chunked | liger | none, ...
    attention: str = "auto"
    padding_free: bool = False
    cross_entropy: str = "chunked"
    liger: bool = False
    lean_lora: bool = False
    torch_compile: bool = False
    optim: str = "adamw_torch"
    # a 4-bit base under FSDP2 (torchao NF4): the decoder linear layers whose blocks do not split over the shards,
    # by name within their layer, with how many layers hold one; they stay in the compute dtype
    unquantized_layers: dict = field(default_factory=dict)
    # strategy megatron: the train keys of its layout and recompute as priced (`megatron_memory.Parallel.record`),
    # the data-parallel size and global batch, and whether the plan chose the layout; empty for other backends
    model_parallel: dict = field(default_factory=dict)
    # the time model's step (planner/step_time.py): seconds term by term, tokens/s per device, MFU, the overlap
    step_time: dict = field(default_factory=dict)

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
        return method_name(self.finetuning_type, self.quantization_bit)

    def most_that_fits(self) -> str:
        """The workstation owner's question: how far each knob goes with this method."""
        parts = [f"lora_rank {self.max_lora_rank}"] if self.max_lora_rank is not None else []
        parts += [f"cutoff_len {self.max_cutoff_len}", f"per_device_train_batch_size {self.max_batch_size}"]
        return f"most that fits with {self.method()}: " + ", ".join(parts) + " (each with the others as configured)"

    def summary(self) -> str:
        fit = f"fits; max cutoff_len {self.max_cutoff_len}" if self.fits else "does NOT fit"
        mp = self.model_parallel
        batches = "padding-free" if self.padding_free else "packed" if self.packing else "padded"
        attention = f"attention {self.attention}"
        strategy, recompute = self.strategy, f"checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        if mp:
            vpp = mp.get("virtual_pipeline_model_parallel_size")
            strategy += (
                f" TP {mp['tensor_model_parallel_size']} × PP {mp['pipeline_model_parallel_size']}"
                f"{f' (×{vpp} virtual)' if vpp else ''} × CP {mp['context_parallel_size']} × DP "
                f"{mp['data_parallel_size']}, global batch {mp['global_batch_size']}"
            )
            recompute = f"recompute {mp['recompute_granularity'] or 'off'}"
            attention = f"{'Transformer Engine' if mp['transformer_engine'] else 'megatron'} attention"
        return (
            f"plan: {self.method()} · {strategy} · {self.launcher} ×{self.world_size} · {recompute} · "
            f"{self.per_gpu_memory_gib:.2f} of {self.gpu_memory_gib:.2f} GiB per "
            f"{'GPU' if self.device == 'cuda' else 'process'} ({fit}) · {attention} · "
            f"{batches} batches · {self.cross_entropy} cross-entropy"
            f"{' · liger' if self.liger else ''}{' · compiled' if self.torch_compile else ''}"
        )

    def timing(self) -> str:
        """The time model's step on one line, with what it assumes."""
        t = self.step_time
        if not t:
            return "step time: not estimated for this backend"
        unit = "GPU" if self.device == "cuda" else "process"
        return (
            f"step time ~{t['step_s']:.3g} s: compute {t['compute_s']:.3g}, elementwise {t['memory_s']:.3g}, "
            f"operators {t['overhead_s']:.3g}, communication {t['communication_s']:.3g} "
            f"({t['exposed_communication_s']:.3g} exposed; {t['overlap']}) · {t['tokens_per_s']:,.0f} tokens/s per "
            f"{unit} · MFU {t['mfu']:.0%}"
        )

    def resolve(self, cfg: RunConfig) -> RunConfig:
        """The config the worker and strategies read: `cfg` with the plan's decisions, frozen (after launch nothing
        writes it). megatron: the layout and recompute as planned, and packing as decided (off unless asked)."""
        train = {"strategy": self.strategy, "optim": self.optim}
        data = {"padding_free": self.padding_free}
        if self.model_parallel:
            train.update({k: v for k, v in self.model_parallel.items() if hasattr(cfg.train, k)})
            data["packing"] = self.packing
        return cfg.replace(
            model={
                "quantization_bit": self.quantization_bit,
                "flash_attn": self.attention,
                "enable_liger_kernel": self.liger,
            },
            data=data,
            finetuning={
                "finetuning_type": self.finetuning_type,
                "disable_gradient_checkpointing": not self.gradient_checkpointing,
                "lean_lora": self.lean_lora,
            },
            train=train,
        ).freeze()


def require_fit(plan: Plan) -> None:
    """`lf-dist train` refuses a plan that cannot fit, before anything is loaded."""
    if plan.fits:
        return
    raise UserError(
        f"plan: {plan.method()} needs {plan.per_gpu_memory_gib:.2f} GiB per device, {plan.profile} has "
        f"{plan.gpu_memory_gib:.2f} GiB; {plan.suggestion or 'no change found that fits'} "
        "(see `lf-dist plan`, or set finetuning_type: auto)"
    )
