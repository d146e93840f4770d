"""What a setup needs: the run's memory per device (and per node for what is offloaded) for any method, rank,
length, batch or GPU count, and the most of each that fits. The planner and its advice ask it."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import replace

from lf_dist.config import RunConfig
from lf_dist.parallel import registry
from lf_dist.parallel.registry import get_backend
from lf_dist.planner import kernel_choice, megatron_memory
from lf_dist.planner.memory import GIB, Setup, estimate, host_bytes
from lf_dist.planner.model_size import ModelSize, measure, read_model_config, trainable_params
from lf_dist.planner.profiles import HardwareProfile

HOST_MARGIN = 0.9  # what is offloaded may take 90% of a node's RAM (the OS, data loading and pinned buffers)


class Sizing:
    """The model read from its config.json (nothing else of it is fetched) and the layout the planner chose:
    `world` ranks, `per_node` on each, `strategy` with DeepSpeed's `zero_stage` and whether it `offload`s."""

    def __init__(self, cfg: RunConfig, hw: HardwareProfile, stage, world, per_node, strategy, zero_stage, offload):
        self.cfg, self.hw, self.stage = cfg, hw, stage
        self.config = read_model_config(cfg.model.model_name_or_path, cfg.model.trust_remote_code, cfg.model)
        self.size: ModelSize = measure(self.config, stage.head)
        self.world, self.per_node, self.strategy = world, per_node, strategy
        self.zero_stage, self.offload = zero_stage, offload
        # a CPU machine's RAM is shared by the processes on it
        self.capacity = hw.gpu_memory_gib if hw.on_gpu else hw.gpu_memory_gib / max(self.per_node, 1)
        self.parallel = None  # strategy megatron: its layout and settings (megatron_memory.Parallel)
        if megatron_memory.is_megatron(strategy):
            self.parallel = megatron_memory.Parallel.of(cfg, world, hw.on_gpu)
            self.kernels = megatron_memory.kernels(cfg, self.parallel)
        else:
            self.kernels = kernel_choice.choose(cfg, hw, self.config, stage, self.strategy)
        self._trainable: dict[tuple, int] = {}

    def with_megatron(self, layout) -> Sizing:
        """The same run priced as strategy megatron over `layout` (the model is not measured again)."""
        other = copy.copy(self)
        other.strategy, other.zero_stage, other.offload = megatron_memory.megatron_backend().name, 0, False
        other.parallel = megatron_memory.Parallel.of(self.cfg, self.world, self.hw.on_gpu, layout)
        other.kernels = megatron_memory.kernels(self.cfg, other.parallel)
        return other

    def checkpointing_options(self) -> tuple[list, bool]:
        """(the settings the search tries in order, whether the config gave them): gradient checkpointing off,
        then on; megatron's recompute off, selective (the attention core), then full."""
        finetuning_args, given = self.cfg.finetuning, self.cfg.given
        gc_given = bool({"disable_gradient_checkpointing", "gradient_checkpointing"} & given)
        if self.parallel is not None and self.cfg.train.recompute_granularity:
            return [self.cfg.train.recompute_granularity], True
        if gc_given:
            return [not finetuning_args.disable_gradient_checkpointing], True
        return ([False, "selective", "full"] if self.parallel is not None else [False, True]), False

    def packing(self) -> bool:
        """Whether rows are packed: megatron packs them only when asked (Transformer Engine's layers run them)."""
        if self.parallel is not None and "packing" not in self.cfg.given:
            return False
        return bool(self.cfg.data.packing)

    def trainable(self, method: str, rank: int | None = None) -> int:
        """Trainable parameters of `method` (LoRA at `rank`, else lora_rank). LoRA's count is affine in the rank
        (A and B grow with it; DoRA's magnitudes and saved modules do not): two counts give every rank."""
        rank = rank or self.cfg.finetuning.lora_rank
        if method != "lora":
            rank = 0
        key = (method, rank)
        if key not in self._trainable:
            if method == "full":  # every parameter: measured already
                self._trainable[key] = self.size.num_params
            elif method == "lora" and rank not in (1, 2):
                one, two = self.trainable("lora", 1), self.trainable("lora", 2)
                self._trainable[key] = one + (rank - 1) * (two - one)
            else:
                self._trainable[key] = trainable_params(
                    self.config, self.stage.head, self.cfg, method, rank or None, self.size
                )
        return self._trainable[key]

    def setup(
        self, method: str, bits: int | None, checkpointing: bool, cutoff: int, batch: int, rank=None, world=None
    ) -> Setup:
        training_args = self.cfg.train
        frozen = self.stage.frozen(with_method(self.cfg, method))
        rows = batch * self.stage.data.sequences
        new_tokens = self.stage.generates(self.cfg) if self.stage.generates else 0
        cutoff = cutoff + new_tokens  # a rollout's rows: the prompt (cut at cutoff_len), then its completion
        first_trainable = self.cfg.finetuning.freeze_trainable_layers
        world = world or self.world
        # more GPUs than a backend that replicates the weights: the scale-out backend shards them
        sharded_more = world != self.world and not get_backend(self.strategy).memory.shards("weights", 3)
        shards = get_backend(registry.SCALE_OUT if sharded_more else self.strategy).shard_group(self.cfg, world)
        return Setup(
            method=method,
            trainable=self.trainable(method, rank),
            quant_bits=bits,
            double_quant=self.cfg.model.double_quantization,
            compute_bytes=2 if (training_args.bf16 or training_args.fp16 or self.cfg.finetuning.pure_bf16) else 4,
            strategy=registry.SCALE_OUT if sharded_more else self.strategy,
            zero_stage=self.zero_stage,
            dp=shards,
            offload=self.offload,
            checkpointing=checkpointing,
            tokens=rows * cutoff,
            frozen_copies=sum(1 for fm in frozen if fm.path is not None),
            frozen_forward=bool(frozen),
            optimizer_bytes=2 if "8bit" in training_args.optim else 8,
            seq_len=cutoff,
            rows=rows,
            attention_mask=self._builds_mask(),
            chunked_logits=self.kernels.cross_entropy != "none",
            recomputed_logits=self.kernels.cross_entropy == "chunked",
            on_cpu=not self.hw.on_gpu,
            graph_layers=first_trainable if method == "freeze" and first_trainable > 0 else None,
            accumulation=training_args.gradient_accumulation_steps,
            logit_width=self.size.vocab_size if self.stage.head.scores_vocabulary else 1,
            trainable_padding=self.padding(method, rank, shards, registry.SCALE_OUT if sharded_more else None),
            new_tokens=new_tokens,
            generated_rows=rows * self.stage.loader_shape(self.cfg)[1] if new_tokens else 0,
        )

    def padding(self, method: str, rank: int | None, shards: int, strategy: str | None = None) -> float:
        """LoRA values per rank beyond an even split, where the backend shards each weight's rows (FSDP2: every
        rank holds ceil(rows / shards) rows, so past lora_rank ranks each holds a padded row of every A)."""
        if method != "lora" or shards <= 1 or not get_backend(strategy or self.strategy).memory.pads_rows:
            return 0.0
        r = rank or self.cfg.finetuning.lora_rank
        targets = [t.strip() for t in (self.cfg.finetuning.lora_target or "all").split(",") if t.strip()]
        excess = 0.0
        for name, rows, cols in self.size.linear_shapes:
            if targets == ["all"] or name.rsplit(".", 1)[-1] in targets:  # A: r × cols, B: rows × r
                excess += math.ceil(r / shards) * cols + math.ceil(rows / shards) * r - (r * cols + rows * r) / shards
        return excess

    def _builds_mask(self) -> bool:
        """Whether attention gets a 4-D mask: eager always; otherwise only rows whose examples are kept apart
        (neat packing, packed pairs, padding-free) without a separating kernel (`model_inputs`)."""
        k, data_args = self.kernels, self.cfg.data
        if k.attention == "disabled":
            return True
        packed = bool(data_args.packing) and self.stage.data.packs
        separated = k.padding_free or (packed and (data_args.neat_packing or self.stage.data.sequences > 1))
        return separated and k.attention not in kernel_choice.SEPARATING

    def memory(self, method, bits, checkpointing, cutoff=None, batch=None, rank=None, world=None, **changes) -> dict:
        """GiB per device, term by term, and "host": per node, what is offloaded. `changes` replace Setup fields
        (another strategy, offload) to ask what if."""
        cutoff = cutoff or self.cfg.data.cutoff_len
        batch = batch or self.cfg.train.per_device_train_batch_size
        setup = replace(self.setup(method, bits, bool(checkpointing), cutoff, batch, rank, world), **changes)
        if self.parallel is not None and megatron_memory.is_megatron(setup.strategy):
            par = self.parallel.with_recompute(checkpointing, self.cfg)
            mem = megatron_memory.estimate(self.size, setup, par, self.hw.runtime_overhead_gib)
        else:
            mem = estimate(self.size, setup, self.hw.runtime_overhead_gib)
        per_node = self.per_node if world is None else min(world, self.hw.devices_per_node)
        mem["host"] = round(host_bytes(self.size, setup, per_node) / GIB, 3)
        return mem

    def step_time(self, method, bits, checkpointing, world=None, accumulation=None, strategy=None, shards=None):
        """The time model's estimate of one optimizer step (`step_time.StepTime`) on `world` ranks (default: the
        planned ones); `accumulation`, `strategy` and HSDP's `shards` ask what if."""
        from lf_dist.planner import step_time

        world = world or self.world
        setup = self.setup(
            method,
            bits,
            bool(checkpointing),
            self.cfg.data.cutoff_len,
            self.cfg.train.per_device_train_batch_size,
            world=world,
        )
        changes = {"accumulation": accumulation, "strategy": strategy, "dp": shards}
        setup = replace(setup, **{k: v for k, v in changes.items() if v is not None})
        rank = self.cfg.finetuning.lora_rank if method in ("lora",) else 0
        hw = self.hw.with_nodes(max(1, math.ceil(world / max(self.per_node, 1))))
        if self.parallel is not None:
            par = (
                self.parallel if world == self.world else megatron_memory.Parallel.of(self.cfg, world, self.hw.on_gpu)
            )
            return step_time.megatron_estimate(
                self.size, setup, hw, self.per_node, rank, par.layout, par.distributed_optimizer
            )
        return step_time.estimate(self.size, setup, hw, world, self.per_node, rank)

    def fits(self, mem: dict, limit: float | None = None) -> bool:
        """Within the device's memory (or `limit`), and what is offloaded within the node's RAM."""
        host_ok = not self.hw.ram_gib or mem["host"] <= HOST_MARGIN * self.hw.ram_gib
        return mem["total"] <= (self.capacity if limit is None else limit) and host_ok

    def largest(self, upper: int, fits_at) -> int:
        """The largest n in [1, upper] with fits_at(n) (monotone), 0 if none."""
        if not fits_at(1):
            return 0
        lo, hi = 1, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits_at(mid) else (lo, mid - 1)
        return lo

    def max_cutoff(self, method, bits, checkpointing) -> int:
        upper = self.size.max_positions or 1 << 20
        return self.largest(upper, lambda n: self.fits(self.memory(method, bits, checkpointing, cutoff=n)))

    def max_batch(self, method, bits, checkpointing) -> int:
        return self.largest(4096, lambda n: self.fits(self.memory(method, bits, checkpointing, batch=n)))

    def max_rank(self, method, bits, checkpointing) -> int | None:
        """The largest power-of-two LoRA rank that fits (up to the hidden size), None without LoRA."""
        if method != "lora":
            return None
        ranks = [2**i for i in range(int(math.log2(self.size.hidden_size)) + 1)]
        fitting = [r for r in ranks if self.fits(self.memory(method, bits, checkpointing, rank=r))]
        return max(fitting, default=0)


def with_method(cfg: RunConfig, method: str) -> RunConfig:
    """`cfg` as it would run with fine-tuning `method` (a light copy: the other sections are shared, read-only)."""
    return dataclasses.replace(cfg, finetuning=dataclasses.replace(cfg.finetuning, finetuning_type=method))
