"""`lf-dist plan --scaling`: the planned run's step on 1, 2, 4, … N nodes (the per-device batch kept, the global batch
growing with the ranks), the node count past which communication dominates, and what to do there."""

from __future__ import annotations

from dataclasses import dataclass

from lf_dist.parallel.registry import get_backend
from lf_dist.planner.plan import Plan
from lf_dist.planner.sizing import Sizing
from lf_dist.planner.step_time import StepTime


@dataclass
class Row:
    nodes: int
    world: int
    time: StepTime


def node_counts(max_nodes: int) -> list[int]:
    counts, n = [], 1
    while n < max_nodes:
        counts.append(n)
        n *= 2
    return [*counts, max_nodes]


def sizing_of(cfg, hw, stage, plan: Plan) -> Sizing:
    zero_stage, offload = get_backend(plan.strategy).sharding(cfg)
    return Sizing(cfg, hw, stage, plan.world_size, plan.nproc_per_node, plan.strategy, zero_stage, offload)


def scaling(cfg, hw, stage, plan: Plan, max_nodes: int) -> tuple[list[Row], list[str]]:
    """(a row per node count, the verdict and advice lines)."""
    p = sizing_of(cfg, hw, stage, plan)
    method, bits, gc = plan.finetuning_type, plan.quantization_bit, plan.gradient_checkpointing
    per_node = plan.nproc_per_node
    replica = 1  # megatron: ranks one copy of the model spans (TP × PP × CP); fewer cannot hold it
    if p.parallel is not None:
        replica = p.parallel.layout.tp * p.parallel.layout.pp * p.parallel.layout.cp
    counts = [n for n in node_counts(max_nodes) if n * per_node >= replica and (n * per_node) % replica == 0]
    rows = [
        Row(n, n * per_node, p.step_time(method, bits, gc, world=n * per_node, strategy=p.strategy)) for n in counts
    ]
    past = next((r for r in rows if r.time.comm_dominates), None)
    if past is None:
        return rows, [f"communication stays below the compute up to {rows[-1].nodes} node(s)"]
    lines = [
        f"communication dominates from {past.nodes} node(s) ({past.world} ranks): {past.time.communication_s:.3g} s "
        f"per step against {past.time.step_s - past.time.exposed_communication_s:.3g} s of compute "
        f"({past.time.exposed_communication_s:.3g} s exposed)"
    ]
    accum = cfg.train.gradient_accumulation_steps * 4
    more = p.step_time(method, bits, gc, world=past.world, accumulation=accum, strategy=p.strategy)
    shards_weights = get_backend(p.strategy).memory.shards("weights", p.zero_stage)
    if (
        shards_weights
        and per_node > 1
        and p.setup(method, bits, gc, cfg.data.cutoff_len, 1, world=past.world).dp > per_node
    ):
        hsdp = p.step_time(method, bits, gc, world=past.world, shards=per_node, strategy=p.strategy)
        lines.append(
            f"advice: HSDP with fsdp_shard_size: {per_node} keeps the gathers inside a node: "
            f"{hsdp.tokens_per_s:,.0f} tokens/s per device instead of {past.time.tokens_per_s:,.0f} "
            "(each node holds a whole copy of the sharded state: check `lf-dist plan` with it for memory)"
        )
    gain = more.tokens_per_s / past.time.tokens_per_s - 1
    if gain > 0.05:
        lines.append(
            f"advice: gradient_accumulation_steps: {accum} spreads the gradient reductions over 4x the tokens: "
            f"{more.tokens_per_s:,.0f} tokens/s per device ({gain:+.0%})"
        )
    else:
        lines.append(
            f"gradient_accumulation_steps: {accum} would gain {gain:+.0%}"
            + (": the weights' gathers repeat with every micro-batch" if shards_weights else "")
        )
    return rows, lines


def table(rows: list[Row], unit: str) -> list[str]:
    out = [f"{'nodes':>6} {'ranks':>6} {'step s':>9} {'comm s':>9} {'exposed':>9} {'tokens/s/' + unit:>16} {'MFU':>6}"]
    for r in rows:
        t = r.time
        out.append(
            f"{r.nodes:>6} {r.world:>6} {t.step_s:>9.3g} {t.communication_s:>9.3g} {t.exposed_communication_s:>9.3g} "
            f"{t.tokens_per_s:>16,.0f} {t.mfu:>6.0%}"
        )
    return out
