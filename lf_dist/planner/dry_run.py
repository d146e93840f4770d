"""`lf-dist plan --dry-run`: the plan checked at a size nobody has here. The planned model is built on the meta
device (no weights, no memory), sharded by the chosen strategy's real `parallelize()` under a fake process group
of the planned world size (torch's fake backend, as torchtitan's dry run does), and what a rank then holds is
read off its shards: parameters, gradients and AdamW's states, next to the planner's terms (`state_bytes`).

A 4-bit base (FSDP2's torchao NF4) is counted from the shard shapes: quantizing on meta takes minutes for a
400B model, and sharding the NF4 tensors gives the same shapes as the compute-dtype weights they replace. The
block rule (`nf4.splits`) picks the weights that stay in the compute dtype, as the run's `nf4.quantize` does.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist

from lf_dist.errors import UserError
from lf_dist.model.loader import compute_dtype
from lf_dist.parallel import nf4
from lf_dist.parallel.base import decoder_layers, storage_bytes
from lf_dist.parallel.fsdp2 import FSDP2Strategy, build_mesh, parallelize
from lf_dist.parallel.registry import BACKENDS, get_backend
from lf_dist.planner.memory import GIB, state_bytes
from lf_dist.planner.model_size import _apply, meta_model, read_model_config
from lf_dist.planner.plan import Plan
from lf_dist.planner.sizing import Sizing

STATES = ("parameters", "gradients", "optimizer")
ADAM_MOMENTS = 2  # AdamW's exp_avg and exp_avg_sq, each in the parameter's dtype


@dataclass
class DryRun:
    """What one rank holds once the planned model is sharded, in bytes: rank 0's shards (FSDP2 pads a dimension
    that does not divide to rank 0's chunk, and every rank allocates that padded size for its parameters and
    gradients), the even split (every rank's bytes / ranks) and the planner's terms."""

    strategy: str
    world_size: int
    mesh: dict
    method: str
    model: str
    rank0: dict
    even: dict
    planned: dict
    seconds: float = 0.0
    nf4_weights: int = 0  # decoder linear weights held in NF4
    unquantized_layers: dict = field(default_factory=dict)  # by name within their layer, with their count
    offloaded: bool = False  # fsdp_cpu_offload: the shards live in CPU memory (same bytes)

    def difference(self, which: str = "rank0") -> dict:
        """Relative difference of rank 0's (or the even split's) bytes from the planner's, per state."""
        held = getattr(self, which)
        return {k: (held[k] - self.planned[k]) / self.planned[k] if self.planned[k] else 0.0 for k in STATES}

    def to_dict(self) -> dict:
        return {**asdict(self), "difference": self.difference(), "even_difference": self.difference("even")}

    def lines(self) -> list[str]:
        mesh = " × ".join(f"{k} {v}" for k, v in self.mesh.items())
        out = [
            f"dry run: {self.method} · {self.strategy} over {self.world_size} ranks (mesh {mesh}) · {self.model} "
            f"built on meta and sharded by parallelize() in {self.seconds:.1f} s",
            f"  {'per rank (GiB)':<16}{'rank 0':>10}{'even split':>12}{'planned':>10}{'rank 0 vs plan':>16}",
        ]
        diff = self.difference()
        for k in STATES:
            out.append(
                f"  {k:<16}{self.rank0[k] / GIB:>10.4f}{self.even[k] / GIB:>12.4f}{self.planned[k] / GIB:>10.4f}"
                f"{diff[k]:>+16.2%}"
            )
        if any(self.rank0[k] > self.even[k] * 1.001 for k in STATES):
            out.append(
                f"  rank 0 > even split: FSDP2 gives every rank ceil(rows / {self.mesh.get('dp_shard')}) rows of a "
                "weight whose rows do not divide over the shards (LoRA's A has lora_rank rows), and each rank "
                "allocates that padded shard for parameters and gradients"
            )
        if self.offloaded:
            out.append("  fsdp_cpu_offload: these shards live in CPU memory")
        if self.nf4_weights or self.unquantized_layers:
            kept = ", ".join(f"{n} ×{c}" for n, c in self.unquantized_layers.items()) or "none"
            out.append(
                f"  NF4 (sizes from the shard shapes, {nf4.bytes_per_value() * 8:.2f} bits per value): "
                f"{self.nf4_weights} decoder linear weights; unquantized, in the compute dtype "
                f"(blocks do not split): {kept}"
            )
        return out


def covered() -> list[str]:
    """The backends the dry run covers: those whose strategy shards with FSDP2's `parallelize`."""
    return [name for name, spec in BACKENDS.items() if issubclass(spec.load(), FSDP2Strategy)]


def _check_covered(plan: Plan) -> None:
    names = covered()
    if plan.strategy in names:
        return
    spec = get_backend(plan.strategy)
    hint = "plan for more than one rank (--profile, --nnodes)" if spec.one_process else f"set strategy: {names[0]}"
    raise UserError(
        f"--dry-run: covers strategy {' or '.join(names)} (HSDP with fsdp_shard_size), not {spec.shown} "
        f"({plan.world_size} rank(s)); {hint}"
    )


@contextlib.contextmanager
def fake_group(world_size: int):
    """A process group of `world_size` ranks in this one process, this process rank 0: collectives return at
    once without moving data (torch's fake backend)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("--dry-run: this process already has a process group; run it outside a launched run")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Chunks(Sequence):
    """`torch.chunk(tensor, n, dim)` padded with empty tensors to `n` entries, as FSDP2's `_chunk_with_empty`
    returns, but each chunk made only when asked for: FSDP2 reads this rank's and rank 0's, and at 1,024 ranks
    building all of them (a view or an empty tensor per rank, per parameter) is most of a dry run's time."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        self.size = -(-tensor.size(dim) // num_chunks) if tensor.size(dim) else 0

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.num_chunks))]
        i = range(self.num_chunks)[i]
        start, total = i * self.size, self.tensor.size(self.dim)
        if start >= total:  # torch.chunk gives fewer chunks; FSDP2 pads with empty ones
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.size, total - start))


@contextlib.contextmanager
def _lazy_chunks():
    """FSDP2's per-rank chunks made on demand while the model is sharded (where this torch has the function)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:
        yield
        return
    _fsdp_param._chunk_with_empty = _Chunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def _run_config(cfg, plan: Plan):
    """The config as the run reads it, for building the model: checkpointing, lean LoRA's forward and an adapter
    to continue change no parameter shape (the planner counts a new adapter of the configured shape too)."""
    return plan.resolve(cfg).replace(
        model={"adapter_name_or_path": None},
        finetuning={"disable_gradient_checkpointing": True, "lean_lora": False},
    )


def build_meta(run_cfg, head, strategy_class) -> torch.nn.Module:
    """The fine-tuning model on the meta device, in the dtype the strategy loads it in (peft's adapters too:
    built under the meta device, they are never allocated)."""
    model_args = run_cfg.model
    config = read_model_config(model_args.model_name_or_path, model_args.trust_remote_code, model_args)
    # load_dtype reads only the config: ask the strategy itself rather than repeat its rule here
    dtype = strategy_class.load_dtype(SimpleNamespace(cfg=run_cfg)) or compute_dtype(run_cfg)
    with torch.device("meta"):
        return _apply(meta_model(config, head).to(dtype), run_cfg, head)


def nf4_layout(model, shards: int) -> tuple[set[str], dict[str, int]]:
    """The parameter names `nf4.quantize` would turn into NF4 over `shards` ranks, and the linear layers that stay
    in the compute dtype, by name within their layer (peft's `.base_layer` left out) with their count."""
    layers = decoder_layers(model)
    linears = nf4.quantizable_linears(model, layers)
    kept_ids = {id(m) for m in linears.values() if not nf4.splits(*m.weight.shape, shards)}
    quantized = {f"{name}.weight" for name, m in linears.items() if id(m) not in kept_ids}
    kept: dict[str, int] = {}
    for layer in layers:
        for name, module in layer.named_modules():
            if id(module) in kept_ids:
                short = name.removesuffix(".base_layer")
                kept[short] = kept.get(short, 0) + 1
    return quantized, kept


def _shard_count(param) -> int:
    """The ranks a parameter is split over: the mesh dimensions it is sharded on (HSDP replicates the others)."""
    if not hasattr(param, "placements"):
        return 1
    return math.prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if p.is_shard())


def held_bytes(model, nf4_names: set[str]) -> tuple[dict, dict]:
    """(rank 0's bytes, the even split's) per state: the local shard of every parameter (NF4 ones at NF4's bytes
    per value); for the trainable ones a gradient and AdamW's two moments, each in the parameter's dtype (fp32)."""
    rank0, even = dict.fromkeys(STATES, 0), dict.fromkeys(STATES, 0.0)
    for name, param in model.named_parameters():
        local = getattr(param, "_local_tensor", param)
        per_value = nf4.bytes_per_value() if name in nf4_names else local.element_size()
        mine = storage_bytes(param) if name not in nf4_names else local.numel() * per_value
        share = param.numel() * per_value / _shard_count(param)
        rank0["parameters"] += mine
        even["parameters"] += share
        if param.requires_grad:  # gradients and optimizer states take the trainable parameter's dtype
            for state, copies in (("gradients", 1), ("optimizer", ADAM_MOMENTS)):
                rank0[state] += copies * mine
                even[state] += copies * share
    return rank0, even


def planned_bytes(cfg, hw, stage, plan: Plan) -> dict[str, float]:
    """The planner's per-rank terms for the plan's choice, as `make_plan` sized them."""
    zero_stage, offload = get_backend(plan.strategy).sharding(cfg)
    sizing = Sizing(cfg, hw, stage, plan.world_size, plan.nproc_per_node, plan.strategy, zero_stage, offload)
    setup = sizing.setup(
        plan.finetuning_type,
        plan.quantization_bit,
        plan.gradient_checkpointing,
        cfg.data.cutoff_len,
        cfg.train.per_device_train_batch_size,
    )
    return state_bytes(sizing.size, setup)


def dry_run(cfg, hw, stage, plan: Plan) -> DryRun:
    """Build, shard and count the plan's model at the plan's world size (see the module's docstring)."""
    _check_covered(plan)
    start = time.perf_counter()
    run_cfg = _run_config(cfg, plan)
    model = build_meta(run_cfg, stage.head, get_backend(plan.strategy).load())
    with fake_group(plan.world_size):
        mesh = build_mesh("cpu", plan.world_size, run_cfg.train.fsdp_shard_size)
        shards = mesh["dp_shard"].size()
        nf4_names, kept = nf4_layout(model, shards) if plan.quantization_bit else (set(), {})
        with _lazy_chunks():
            model = parallelize(model, mesh, run_cfg)
        rank0, even = held_bytes(model, nf4_names)
        shape = dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))
    return DryRun(
        strategy=plan.strategy,
        world_size=plan.world_size,
        mesh=shape,
        method=plan.method(),
        model=str(cfg.model.model_name_or_path),
        rank0=rank0,
        even=even,
        planned=planned_bytes(cfg, hw, stage, plan),
        seconds=round(time.perf_counter() - start, 2),
        nf4_weights=len(nf4_names),
        unquantized_layers=kept,
        offloaded=bool(run_cfg.train.fsdp_cpu_offload),
    )
