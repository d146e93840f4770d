"""The time model: seconds per optimizer step from a profile's rates, term by term, before anything runs.

- compute: the matmuls' FLOPs (every decoder linear, attention's scores and values, the output layer at every
  token: an upper bound where prompts carry no labels) at the profile's achieved matmul rate. A frozen weight has
  no weight gradient (its backward is the input gradient only); LoRA adds its small matmuls; checkpointing
  recomputes each layer's forward; a frozen reference adds a forward;
- memory: the elementwise work between the matmuls (norms, rotary, softmax, SiLU, residuals, cross-entropy over
  the vocabulary, the optimizer's update), as bytes at the profile's elementwise bandwidth — on small models this
  costs as much as the matmuls;
- overhead: a fixed time per operator (a kernel launch, or the CPU's dispatch) times the operators of a step; a
  GPU computes while the next kernels are dispatched, so there the step pays the longer of the two;
- communication: the volumes each sharding moves — ZeRO-3 / FSDP2 gather the weights for the forward and again
  for the backward and reduce-scatter the gradients per micro-batch; ZeRO-2 reduce-scatters the gradients per
  micro-batch and gathers the updated weights once; DDP all-reduces the gradients once per step; HSDP gathers and
  reduce-scatters inside its shard group and all-reduces the shards across the replicas. A collective over several
  nodes crosses the network once per node; each has a latency per hop of a binary tree.

Overlap assumed: on GPUs (NCCL on its own streams) the gathers and reductions run under the compute, and only what
exceeds it is exposed, plus one layer's gather before the first forward; on a CPU (gloo shares the cores that
compute) nothing overlaps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lf_dist.kernels.cross_entropy import chunk_size
from lf_dist.planner.memory import Setup
from lf_dist.planner.model_size import ModelSize
from lf_dist.planner.profiles import HardwareProfile

# Elementwise values read or written per token in one decoder layer's forward, per width (eager PyTorch, one pass
# per operator): two RMSNorms in fp32 (~12 passes of the hidden size each), two residual adds, rotary on q and k
# (~10 passes), the layout copies of q, k, v and the attention output, and SwiGLU (~5 passes of the intermediate).
HIDDEN_PASSES = 24 + 6 + 4
QKV_PASSES = 10 + 2
INTERMEDIATE_PASSES = 5
SCORE_PASSES = 4  # a masked (eager or math) attention materializes its scores: scale, mask, softmax, dropout
BACKWARD_ELEMENTWISE = 2.0  # the backward's elementwise work relative to the forward's
VOCAB_PASSES = 10  # fp32 logits written, log-softmax's max, sum and output, and their gradient
# a trained output layer under the chunked kernel: its backward's softmax again, the gradient's sign, one-hot and
# scale, and the fp32 weight gradient summed over the chunks (read, added, written per chunk of tokens)
VOCAB_BACKWARD_PASSES = 6
ADAPTER_PASSES = 4  # per adapted linear's output, forward: the update added into the base output (read, write)
OPTIMIZER_BYTES = 40  # AdamW per trainable fp32 value: p, g, m, v read; p, m, v written; zeroing and clipping
# operators per decoder layer of one forward (HF Llama, eager), and per LoRA linear; the backward runs ~1.5x
OPS_PER_LAYER = 60
OPS_PER_ADAPTER = 6
OPS_PER_PARAM_TENSOR = 12  # the optimizer's per-tensor loop (CPU) or its foreach launches (GPU, amortized)


@dataclass(frozen=True)
class Collective:
    kind: str  # all_gather | reduce_scatter | all_reduce | send (point to point)
    bytes: float  # the whole tensor's size (what one rank holds after an all-gather)
    ranks: int
    nodes: int  # nodes the ranks span
    repeats: int  # times the whole volume moves per step (per micro-batch, or for the forward and the backward)
    count: int  # collectives of this kind per step (their latency)


@dataclass
class StepTime:
    compute_s: float
    memory_s: float
    overhead_s: float
    communication_s: float
    exposed_communication_s: float
    step_s: float
    tokens_per_step: int  # per device
    tokens_per_s: float  # per device
    mfu: float  # the method's FLOPs (recompute excluded) over the step, as a share of the device's peak
    overlap: str

    @property
    def comm_dominates(self) -> bool:
        """Communication takes longer than the rest of the step: no overlap can hide it any more."""
        return self.communication_s > self.step_s - self.exposed_communication_s

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _linear_params(size: ModelSize) -> int:
    return sum(rows * cols for _, rows, cols in size.linear_shapes) // max(size.num_layers, 1)


@dataclass(frozen=True)
class Flops:
    """FLOPs per token of forward + backward, recompute included, split by the rate each runs at."""

    dense: float  # the decoder's linears
    output: float  # the output layer
    attention: float  # scores and values
    adapter: float  # LoRA's rank-r matmuls
    useful: float  # the method's FLOPs without recompute: MFU's numerator

    @property
    def total(self) -> float:
        return self.dense + self.output + self.attention + self.adapter


def flop_terms(size: ModelSize, s: Setup, lora_rank: int = 0) -> Flops:
    """The forward, then the backward: input gradients everywhere, weight gradients of trained weights only,
    attention's twice its forward; recompute (checkpointing; the chunked cross-entropy's logits of a trained
    output layer) and a frozen reference's forward on top."""
    h, layers = size.hidden_size, size.num_layers
    linear = 2.0 * _linear_params(size)
    causal = 1.0 if s.attention_mask else 0.5  # a causal kernel skips the upper triangle
    attention = 4.0 * s.seq_len * size.num_heads * size.head_dim * causal
    head = 2.0 * h * max(s.logit_width, 1)
    trains_weights = s.method in ("full", "freeze")
    grad_layers = layers if s.graph_layers is None else max(layers - s.graph_layers, 0)
    lora = 0.0
    if s.method not in ("full", "freeze") and lora_rank:
        lora = 2.0 * lora_rank * sum(rows + cols for _, rows, cols in size.linear_shapes) / max(layers, 1)
    dense = layers * linear + grad_layers * linear * (2.0 if trains_weights else 1.0)
    output = head * (3.0 if s.method == "full" else 2.0)
    attn = (layers + 2.0 * grad_layers) * attention
    adapter = (layers + 2.0 * grad_layers) * lora
    if s.frozen_forward:
        dense, output, attn = dense + layers * linear, output + head, attn + layers * attention
    useful = dense + output + attn + adapter
    if s.checkpointing:
        dense, attn = dense + grad_layers * linear, attn + grad_layers * attention
        adapter += grad_layers * lora
    if s.method == "full" and s.recomputed_logits:  # kernels/cross_entropy.py: the backward's second pass
        output += head
    return Flops(dense, output, attn, adapter, useful)


def flops_per_token(size: ModelSize, s: Setup, lora_rank: int = 0) -> tuple[float, float]:
    """(FLOPs of forward + backward per token, recompute included; the useful share without recompute)."""
    f = flop_terms(size, s, lora_rank)
    return f.total, f.useful


def elementwise_bytes(size: ModelSize, s: Setup, adapters: bool = False) -> tuple[float, float]:
    """(bytes of elementwise work per token, bytes of the optimizer's update per step on this rank)."""
    c = max(s.compute_bytes, 2)
    layer = (
        HIDDEN_PASSES * size.hidden_size
        + QKV_PASSES * (size.hidden_size + 2 * size.kv_size)
        + INTERMEDIATE_PASSES * 2 * size.intermediate_size
    )
    if adapters:
        layer += ADAPTER_PASSES * sum(rows for _, rows, _ in size.linear_shapes) / max(size.num_layers, 1)
    if s.attention_mask:
        layer += SCORE_PASSES * size.num_heads * s.seq_len
    grad_layers = size.num_layers if s.graph_layers is None else max(size.num_layers - s.graph_layers, 0)
    passes = size.num_layers + BACKWARD_ELEMENTWISE * grad_layers + (grad_layers if s.checkpointing else 0)
    passes += size.num_layers if s.frozen_forward else 0
    vocab = max(s.logit_width, 1)
    per_token = c * layer * passes + 4 * VOCAB_PASSES * vocab * (2 if s.frozen_forward else 1)
    if s.method == "full" and s.recomputed_logits:
        per_token += 4 * vocab * (VOCAB_BACKWARD_PASSES + 3 * size.hidden_size / chunk_size(vocab))
    optimizer = OPTIMIZER_BYTES * (s.trainable / max(s.dp, 1) if _shards_optimizer(s) else s.trainable)
    return per_token, optimizer


def fresh_bytes(size: ModelSize, s: Setup) -> float:
    """Bytes a step maps anew on one rank (a CPU's allocator returns large blocks to the system, so each is paged
    in again): a backend that shards the weights (FSDP2, ZeRO-3) unshards them into new storage for the forward
    and again for the backward, and the full gradients of its trained weights, every micro-batch."""
    from lf_dist.parallel.registry import get_backend

    if not get_backend(s.strategy).memory.shards("weights", s.zero_stage):
        return 0.0
    return (2 * _held_bytes(size, s) + 4.0 * s.trainable) * s.accumulation


def _shards_optimizer(s: Setup) -> bool:
    from lf_dist.parallel.registry import get_backend

    return get_backend(s.strategy).memory.shards("optimizer", s.zero_stage)


def operators(size: ModelSize, s: Setup, param_tensors: int, adapters: int) -> float:
    """Operators launched per optimizer step on one rank."""
    per_layer = OPS_PER_LAYER + OPS_PER_ADAPTER * adapters / max(size.num_layers, 1)
    forward = size.num_layers * per_layer + 20  # embedding, final norm, output layer and loss
    per_micro = forward * (2.5 + (1 if s.checkpointing else 0) + (1 if s.frozen_forward else 0))
    return per_micro * s.accumulation + OPS_PER_PARAM_TENSOR * param_tensors


def collectives(size: ModelSize, s: Setup, world: int, nodes: int) -> list[Collective]:
    """What one optimizer step moves on each rank, from how the backend holds the model (`MemoryTerms`):
    weights sharded (ZeRO-3, FSDP2), gradients only (ZeRO-2), the optimizer only (ZeRO-1), or nothing (DDP)."""
    from lf_dist.parallel.registry import get_backend

    if world <= 1:
        return []
    terms, z, m = get_backend(s.strategy).memory, s.zero_stage, s.accumulation
    shard, units = max(s.dp, 1), size.num_layers + 1
    shard_nodes = max(1, math.ceil(shard / max(world // nodes, 1)))
    c = s.compute_bytes
    grads = 4.0 * s.trainable  # fp32 gradients of fp32 trainable weights
    out = []
    if terms.shards("weights", z):
        weights = _held_bytes(size, s)
        out += [Collective("all_gather", weights, shard, shard_nodes, 2 * m, 2 * units * m)]
        out += [Collective("reduce_scatter", grads, shard, shard_nodes, m, units * m)]
        if shard < world:  # HSDP: the shards' gradients are averaged over the replicas
            replicas = Collective("all_reduce", grads / shard, world // shard, max(1, nodes // shard_nodes), m, m)
            out.append(replicas)
    elif terms.shards("gradients", z):
        out += [Collective("reduce_scatter", c * s.trainable, world, nodes, m, units * m)]
        out += [Collective("all_gather", c * s.trainable, world, nodes, 1, 1)]
    else:
        out += [Collective("all_reduce", grads, world, nodes, 1, max(1, math.ceil(grads / 25e6)))]
        if terms.shards("optimizer", z):
            out += [Collective("all_gather", c * s.trainable, world, nodes, 1, 1)]
    return out


def _held_bytes(size: ModelSize, s: Setup) -> float:
    """The weights' bytes as a sharded backend gathers them: the compute dtype, a 4-bit base's linear weights at
    its ~0.53 bytes (NF4 values and absmax)."""
    if s.quant_bits:
        return 0.53 * size.quantizable_params + s.compute_bytes * (size.num_params - size.quantizable_params)
    return s.compute_bytes * size.num_params


def collective_seconds(col: Collective, hw: HardwareProfile) -> float:
    """A ring inside each node, then across the nodes (each node's link carries its share once)."""
    ring = 2.0 if col.kind == "all_reduce" else 1.0
    per_node = max(col.ranks // col.nodes, 1)
    if col.kind == "send":  # point to point, over the node's link or the network
        link = hw.intra_node_gbps if col.nodes == 1 else hw.inter_node_gbps
        return col.repeats * col.bytes / (max(link, 1e-3) * 1e9) + col.count * hw.collective_latency_us * 1e-6
    measured = {"all_gather": hw.all_gather_gbps, "reduce_scatter": hw.reduce_scatter_gbps}.get(col.kind)
    link = measured or hw.intra_node_gbps
    seconds = ring * (per_node - 1) / per_node * col.bytes / (max(link, 1e-3) * 1e9)
    if col.nodes > 1:
        seconds += ring * (col.nodes - 1) / col.nodes * col.bytes / (max(hw.inter_node_gbps, 1e-3) * 1e9)
    hops = max(1, math.ceil(math.log2(max(col.ranks, 2))))
    return col.repeats * seconds + col.count * hops * hw.collective_latency_us * 1e-6


def sharing(hw: HardwareProfile, per_node: int) -> int:
    """Processes that share one device's rates: a CPU's ranks share its cores and memory; a GPU is its rank's."""
    return 1 if hw.on_gpu else max(per_node, 1)


def device_rates(hw: HardwareProfile, compute_bytes: int, per_node: int, width: int) -> tuple[float, float, float]:
    """(achieved matmul FLOP/s at the model's `width`, elementwise bytes/s, peak FLOP/s) of one rank: a CPU's
    processes share its cores and memory bandwidth."""
    peak = hw.peak_bf16_tflops if compute_bytes < 4 else (hw.peak_fp32_tflops or hw.peak_bf16_tflops / 2)
    share = sharing(hw, per_node)
    bandwidth = (hw.memory_gbps or 100.0) * 1e9 / share
    narrow = width / (width + hw.matmul_half_width) if hw.matmul_half_width else 1.0
    return peak * 1e12 * hw.matmul_efficiency * narrow / share, bandwidth, peak * 1e12 / share


def optimizer_rate(hw: HardwareProfile, bandwidth: float, per_node: int, fused: bool = True) -> float:
    """Bytes/s of the optimizer's update (a CPU computes AdamW's square roots and divisions slower than it streams
    its states: calibrated apart, fused and multi-tensor), shared like the bandwidth by a CPU's processes."""
    rate = hw.optimizer_gbps if fused or not hw.unfused_optimizer_gbps else hw.unfused_optimizer_gbps
    if not rate:
        return bandwidth
    return rate * 1e9 / sharing(hw, per_node)


def head_rate(hw: HardwareProfile, matmul: float, per_node: int, width: int, chunked: bool) -> float:
    """The output layer's FLOP/s on one rank: in lf-dist's chunked cross-entropy as calibrated (at width 256, moved
    along the width curve to the model's), else the matmul rate."""
    if not (hw.head_tflops and chunked):
        return matmul
    w0 = hw.matmul_half_width
    along = (width / (width + w0)) / (256 / (256 + w0))
    return min(hw.head_tflops * 1e12 / sharing(hw, per_node) * along, matmul)


def kernel_rates(hw: HardwareProfile, matmul: float, per_node: int, lora_rank: int) -> tuple[float, float]:
    """(attention's FLOP/s, LoRA's rank-r matmuls' FLOP/s) of one rank: as calibrated (LoRA's measured at rank 8
    and scaled along the width curve), else the matmul rate (LoRA's at width r)."""
    share = sharing(hw, per_node)
    attention = hw.attention_tflops * 1e12 / share if hw.attention_tflops else matmul
    w0, r = hw.matmul_half_width, max(lora_rank, 1)
    if hw.adapter_tflops:
        along = (r / (r + w0)) / (8 / (8 + w0))  # the width curve at rank r over its value at rank 8
        return attention, min(hw.adapter_tflops * 1e12 / share * along, matmul)
    return attention, matmul * r / (r + w0)


def layer_overhead(size: ModelSize, s: Setup, hw: HardwareProfile, param_tensors: int, adapters: int) -> float:
    """Seconds per step of fixed costs: a decoder layer's (its modules' Python and dispatch, as calibrated on a
    tiny Llama, else its operators at `op_latency_us`) per pass, and the optimizer's per tensor."""
    per_layer = hw.lora_layer_overhead_us if adapters else hw.layer_overhead_us
    if not per_layer:
        return operators(size, s, param_tensors, adapters) * hw.op_latency_us * 1e-6
    passes = 1 + (0.4 if s.checkpointing else 0) + (0.3 if s.frozen_forward else 0)  # of a forward + backward
    layers = size.num_layers * passes * s.accumulation * per_layer * 1e-6
    return layers + OPS_PER_PARAM_TENSOR * param_tensors * hw.op_latency_us * 1e-6


def busy(work: float, dispatch: float, hw: HardwareProfile) -> float:
    """A GPU runs its kernels while the CPU dispatches the next ones: the longer of the two; a CPU does both."""
    return max(work, dispatch) if hw.on_gpu else work + dispatch


def estimate(size: ModelSize, s: Setup, hw: HardwareProfile, world: int, per_node: int, lora_rank: int) -> StepTime:
    """Seconds of one optimizer step on one rank, term by term, with tokens/s per device and MFU."""
    from lf_dist.parallel.registry import get_backend

    nodes = max(1, math.ceil(world / max(per_node, 1)))
    tokens = s.tokens * s.accumulation
    matmul, bandwidth, peak = device_rates(hw, s.compute_bytes, per_node, size.hidden_size)
    flops = flop_terms(size, s, lora_rank)
    adapters = len(size.linear_shapes) if s.method not in ("full", "freeze") and lora_rank else 0
    attention_rate, adapter_rate = kernel_rates(hw, matmul, per_node, lora_rank)
    per_token, optimizer = elementwise_bytes(size, s, adapters=bool(adapters))
    tensors = 2 * adapters if adapters else len(size.linear_shapes) + 2 * size.num_layers + 3
    output_rate = head_rate(hw, matmul, per_node, size.hidden_size, s.recomputed_logits)
    seconds_per_token = flops.dense / matmul + flops.output / output_rate
    compute = tokens * (seconds_per_token + flops.attention / attention_rate + flops.adapter / adapter_rate)
    backend = get_backend(s.strategy)
    update = optimizer_rate(hw, bandwidth, per_node, backend.fused_optimizer)
    memory = tokens * per_token / bandwidth + optimizer / update
    if hw.fresh_memory_gbps:
        memory += fresh_bytes(size, s) / (hw.fresh_memory_gbps * 1e9 / sharing(hw, per_node))
    if backend.engine_cost:  # the engine's own work per trainable value, as calibrated (a CPU's processes share)
        memory += getattr(hw, backend.engine_cost) * 1e-9 * s.trainable * sharing(hw, per_node)
    overhead = layer_overhead(size, s, hw, tensors, adapters)
    comm = sum(collective_seconds(col, hw) for col in collectives(size, s, world, nodes))
    if hw.on_gpu:  # NCCL on its own streams: what the compute hides is not exposed, one layer's gather is
        exposed = max(0.0, comm - compute - memory) + comm / max(size.num_layers + 1, 1) * (world > 1)
        overlap = "communication overlapped with compute (NCCL streams); only what exceeds it is exposed"
    else:
        exposed = comm
        overlap = "no overlap: gloo shares the cores that compute"
    step = busy(compute + memory, overhead, hw) + exposed
    return StepTime(
        compute_s=compute,
        memory_s=memory,
        overhead_s=overhead,
        communication_s=comm,
        exposed_communication_s=exposed,
        step_s=step,
        tokens_per_step=tokens,
        tokens_per_s=tokens / step,
        mfu=tokens * flops.useful / step / peak,
        overlap=overlap,
    )


def megatron_estimate(
    size: ModelSize, s: Setup, hw: HardwareProfile, per_node: int, lora_rank: int, layout, distributed_optimizer: bool
) -> StepTime:
    """megatron's step on one rank: its share of the layers' work over TP × PP × CP, the pipeline's bubble
    ((PP - 1) / VPP over the micro-batches), TP's four all-reduces of a micro-batch's activations per layer (on the
    critical path: never hidden), the activations PP sends each way per micro-batch, and DP's gradient all-reduce
    (hidden under the backward on GPUs as DDP's is)."""
    tp, pp, cp, dp, m = layout.tp, layout.pp, layout.cp, layout.dp, s.accumulation
    split = tp * pp * cp
    tokens, c, h = s.tokens * m, s.compute_bytes, size.hidden_size
    matmul, bandwidth, peak = device_rates(hw, c, per_node, h)
    flops, useful = flops_per_token(size, s, lora_rank)
    per_token, _ = elementwise_bytes(size, s)
    optimizer = OPTIMIZER_BYTES * s.trainable / (dp if distributed_optimizer else 1)  # of the replica's share
    bubble = 1.0 + (pp - 1) / (layout.vpp or 1) / max(m, 1)
    compute = tokens * flops / split / matmul * bubble
    memory = tokens * per_token / split / bandwidth * bubble + optimizer / split / optimizer_rate(
        hw, bandwidth, per_node
    )
    overhead = operators(size, s, 0, 0) * hw.op_latency_us * 1e-6 / pp
    activations = s.tokens / cp * h * c
    model_nodes = max(1, math.ceil(tp * pp * cp / max(per_node, 1)))
    critical = [Collective("all_reduce", activations, tp, 1, 4 * m * size.num_layers // pp, 4 * m)] if tp > 1 else []
    if pp > 1:  # each micro-batch's activations forward and their gradients back, to the next stage
        critical.append(Collective("send", activations, 2, min(model_nodes, 2), 2 * m, 2 * m))
    grads = (
        [
            Collective(
                "all_reduce",
                4.0 * s.trainable / (tp * pp),
                dp,
                max(1, math.ceil(dp * split / per_node) // model_nodes),
                1,
                1,
            )
        ]
        if dp > 1
        else []
    )
    on_path = sum(collective_seconds(col, hw) for col in critical)
    reduce = sum(collective_seconds(col, hw) for col in grads)
    exposed = on_path + (max(0.0, reduce - compute) if hw.on_gpu else reduce)
    step = busy(compute + memory, overhead, hw) + exposed
    return StepTime(
        compute_s=compute,
        memory_s=memory,
        overhead_s=overhead,
        communication_s=on_path + reduce,
        exposed_communication_s=exposed,
        step_s=step,
        tokens_per_step=int(tokens / split),  # a model replica's tokens, per GPU of it
        tokens_per_s=tokens / split / step,
        mfu=tokens * useful / split / step / peak,
        overlap="TP's and PP's transfers on the critical path; DP's gradient all-reduce under the backward",
    )
