"""The memory model: bytes per device of one training setup, term by term.

What each term counts follows what lf-dist builds (not a generic textbook model):
- trainable parameters are kept in fp32 (as LLaMA-Factory does), frozen ones in the compute dtype (FSDP2
  included: its mixed-precision policy casts the fp32 masters for compute) — except DeepSpeed, which keeps
  bf16/fp16 weights with fp32 master copies in the optimizer;
- 4-bit weights take 4 bits plus one fp32 absmax per 64 (double quantization: 8-bit absmax with an fp32
  scale per 256 blocks); only the decoder's linear layers are quantized. bitsandbytes' weights are whole on
  every rank; FSDP2's NF4 (torchao, the same 4.0 + 0.13 bits) are sharded, except the layers whose blocks do not
  split over the ranks, which stay in the compute dtype (`ModelSize.nf4_split`);
- gradients are fp32 like the trainable weights (DDP holds a second copy in its buckets); they overlap with
  the activations the backward frees unless micro-batches accumulate;
- AdamW keeps two fp32 moments per trainable parameter (8-bit AdamW: two bytes);
- activations per token and layer are what autograd saves for a Llama-style layer (measured, see
  `activation_bytes_per_token`); with checkpointing each layer's input is kept and one layer recomputed;
- logits exist only at label positions (`token_logps`), one chunk of tokens at a time (`chunked_logits`,
  `kernels/cross_entropy.py`: ~128 MiB of fp32 logits, plus d logp / d hidden per token); without chunks every
  token is counted (an upper bound; prompts have none), with cross-entropy's saved log-softmax and gradient;
- a frozen reference model is loaded like the policy; its forward without gradients adds its own logits;
- a rollout stage (ppo, grpo) scores completions with full fp32 logits at their positions (temperature and
  entropy need them), and generates first: a KV cache for prompt + new tokens of every row, and under sharding
  the whole model gathered for the call (`Strategy.generate`); generation and the update do not overlap, so the
  step's peak is the larger of the two (`rollout` counts what generation needs beyond the update);
- on a CPU the process's RSS is the measure, and glibc's allocator keeps the blocks a step freed
  (`cpu_allocator_slack`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lf_dist.config.schema import ADAPTER_TYPES
from lf_dist.kernels.cross_entropy import chunk_size
from lf_dist.parallel.nf4 import bytes_per_value as nf4_bytes_per_value
from lf_dist.parallel.registry import MemoryTerms, get_backend
from lf_dist.planner.model_size import ModelSize

GIB = 2**30


@dataclass(frozen=True)
class Setup:
    method: str  # full | freeze | lora (quantized when quant_bits is set)
    trainable: int
    quant_bits: int | None
    double_quant: bool
    compute_bytes: int  # 2 for bf16 / fp16, 4 for fp32
    strategy: str  # single | ddp | fsdp2 | deepspeed
    zero_stage: int  # DeepSpeed's ZeRO stage (0 otherwise)
    dp: int  # ranks a sharded state is split over (HSDP: the shard group)
    offload: bool  # optimizer state (and with ZeRO-3 / FSDP2 the parameters) in CPU memory
    checkpointing: bool
    tokens: int  # tokens through the model with gradients in one micro-batch
    frozen_copies: int  # frozen models loaded next to the policy (a reference)
    frozen_forward: bool  # a reference's forward without gradients (its own model, or adapters off)
    optimizer_bytes: int  # per trainable parameter
    seq_len: int = 0
    rows: int = 1  # sequences (rows) per micro-batch
    attention_mask: bool = False  # rows carry a mask (padding, or packed examples kept apart)
    on_cpu: bool = False  # CPU attention with a mask saves a seq² term per layer
    graph_layers: int | None = None  # decoder layers autograd records (freeze: from the first trainable one)
    accumulation: int = 1  # micro-batches per optimizer step
    logit_width: int = 0  # outputs per token: the vocabulary for a language-model head, 1 for a score head
    chunked_logits: bool = False  # the chunked linear cross-entropy: logits exist one chunk at a time
    recomputed_logits: bool = False  # lf-dist's chunked kernel: a trained output layer's backward recomputes them
    trainable_padding: float = 0.0  # trainable values per rank beyond trainable / dp: FSDP2's padded rows
    new_tokens: int = 0  # a rollout stage's max_new_tokens: rows are generated, then scored at those positions
    generated_rows: int = 0  # rows a rollout generates in one call (every micro-batch of the step)


def _quantized_bytes(n: int, bits: int, double_quant: bool) -> float:
    if bits == 8:
        return n * 1.0
    absmax = (1 + 4 / 256) / 64 if double_quant else 4 / 64
    return n * (0.5 + absmax)


def layer_activation_bytes(size: ModelSize, s: Setup) -> float:
    """What autograd keeps per token for one decoder layer, measured with saved-tensor hooks on Llama layers:
    a·hidden + 2c·kv + 4c·intermediate bytes, where the hidden-size share (norms upcast to fp32, the residual
    stream) is ~34 bytes when every weight trains and ~24 when only adapters do."""
    c, h = s.compute_bytes, size.hidden_size
    per_layer = (
        (34 if s.method in ("full", "freeze") else 24) * h + 2 * c * size.kv_size + 4 * c * size.intermediate_size
    )
    if s.attention_mask and s.on_cpu:  # CPU attention with a mask keeps a seq-long row per token
        per_layer += 3 * c * s.seq_len
    return per_layer


def checkpoint_bytes(size: ModelSize, s: Setup) -> float:
    """Per token and layer with checkpointing: ~1.5 values of the residual stream (fp32 when the weights train or
    the run is fp32, else the compute dtype)."""
    residual = 4 if (s.method in ("full", "freeze") or s.compute_bytes == 4) else 2
    return 1.5 * residual * size.hidden_size


def logit_bytes(c: int) -> int:
    """Per (token, vocabulary entry) at the peak: the output layer's logits and, in bf16, their fp32 copy, then
    cross-entropy's saved log-softmax and its gradient."""
    return c + 8 if c < 4 else 8


def _logits(size: ModelSize, s: Setup) -> float:
    if s.new_tokens:  # a completion's positions only, full fp32 logits: log-softmax, its gradient, the entropy
        return s.rows * s.new_tokens * s.logit_width * (logit_bytes(s.compute_bytes) + 4)
    if not s.chunked_logits:
        return s.tokens * s.logit_width * logit_bytes(c=s.compute_bytes)
    # one chunk: the matmul's output, its fp32 copy in bf16 and the gradient cast back; d logp / d hidden kept
    c = s.compute_bytes
    chunk = min(s.tokens, chunk_size(s.logit_width)) * s.logit_width * (4 if c == 4 else 2 * c + 4)
    return chunk + s.tokens * size.hidden_size * c


def cpu_allocator_slack(transient: float, optimizer: float, uncheckpointed: float, s: Setup) -> float:
    """What a CPU process's RSS holds beyond its live tensors: glibc keeps the blocks a step freed in its arenas.
    Measured (benchmarks/plan_accuracy.py, tests/test_plan_accuracy.py): without checkpointing ~0.85x the step's
    transient tensors (1.2x with bitsandbytes' 4-bit CPU kernels), less half the optimizer's states, which are
    allocated after the first backward from that space; with checkpointing the blocks each layer's recompute
    frees are kept, ~0.6x (full), 0.9x (LoRA), 1.4x (QLoRA) of what the layers would keep without it. A GPU's
    caching allocator reuses freed blocks, and CUDA's peak counts tensors only: no such term there."""
    if s.checkpointing:
        factor = 1.4 if s.quant_bits else (0.6 if s.method in ("full", "freeze") else 0.9)
        return factor * uncheckpointed
    return max(0.0, (1.2 if s.quant_bits else 0.85) * transient - 0.5 * optimizer)


def _terms(s: Setup) -> MemoryTerms:
    return get_backend(s.strategy).memory


def _sharded(s: Setup, state: str = "weights") -> bool:
    return _terms(s).shards(state, s.zero_stage)


def _trainable(s: Setup, state: str = "weights") -> float:
    """Trainable values one rank holds of `state`: its share where sharded, plus FSDP2's row padding (a weight
    splits in ceil(rows / shards) rows per rank: LoRA's A has lora_rank rows, fewer than a large world)."""
    if not _sharded(s, state) or s.dp <= 1:
        return float(s.trainable)
    return s.trainable / s.dp + s.trainable_padding


def _weight_bytes(size: ModelSize, s: Setup) -> float:
    """The weights one rank holds (its shards where sharded)."""
    c, terms = s.compute_bytes, _terms(s)
    shards = s.dp if _sharded(s) else 1
    # adapters (LoRA, OFT) sit beside the whole base; the other methods train part of the model itself
    frozen = size.num_params - (0 if s.method in ADAPTER_TYPES else s.trainable)
    trainable = 4 * _trainable(s)
    if s.quant_bits and terms.quantized_shards:  # NF4 shards; layers it cannot split stay in the compute dtype
        quantized, _ = size.nf4_split(shards)
        return (quantized * nf4_bytes_per_value() + (frozen - quantized) * c) / shards + trainable
    if s.quant_bits:  # whole on every rank
        quantized = _quantized_bytes(size.quantizable_params, s.quant_bits, s.double_quant)
        rest = (frozen - size.quantizable_params) * c  # embeddings, norms, output layer
        return quantized + rest / shards + trainable
    frozen_bytes = terms.frozen_bytes or c
    train_bytes = c if terms.casts_module and c < 4 else 4  # DeepSpeed casts the module; fp32 masters
    return frozen * frozen_bytes / shards + _trainable(s) * train_bytes


def _optimizer_bytes(s: Setup) -> float:
    """AdamW's states of one rank (and DeepSpeed's fp32 master weights in bf16 / fp16)."""
    per_value = s.optimizer_bytes + (4 if _terms(s).casts_module and s.compute_bytes < 4 else 0)
    return _trainable(s, "optimizer") * per_value


def _gradient_bytes(s: Setup) -> float:
    """The gradients of one rank's trainable weights (a second copy in DDP's buckets)."""
    terms = _terms(s)
    per_value = s.compute_bytes if terms.casts_module and s.compute_bytes < 4 else 4
    return _trainable(s, "gradients") * per_value * terms.gradient_copies


def state_bytes(size: ModelSize, s: Setup) -> dict[str, float]:
    """What one rank holds for the whole run, in bytes: its parameters (shards where sharded), their gradients
    and the optimizer's states. `lf-dist plan --dry-run` checks these against the real sharding."""
    return {"parameters": _weight_bytes(size, s), "gradients": _gradient_bytes(s), "optimizer": _optimizer_bytes(s)}


def host_bytes(size: ModelSize, s: Setup, ranks_per_node: int) -> float:
    """CPU memory per node for what offload moves there: every rank's optimizer states and fp32 gradients, and
    under ZeRO-3 / FSDP2 its weight shards (a node holds the shards of all its ranks)."""
    if not s.offload:
        return 0.0
    grads = _trainable(s, "gradients") * 4
    per_rank = _optimizer_bytes(s) + grads + (_weight_bytes(size, s) if _sharded(s) else 0.0)
    return per_rank * ranks_per_node


def _generation_bytes(size: ModelSize, s: Setup, sharded: bool) -> float:
    """A rollout's generation: the KV cache of every row (prompt + new tokens), the last position's logits, and a
    sharded model gathered whole for the call."""
    c = s.compute_bytes
    rows = s.generated_rows or s.rows
    kv = rows * s.seq_len * size.num_layers * 2 * size.kv_size * c
    gathered = size.num_params * c * (1 - 1 / s.dp) if sharded else 0.0
    return kv + gathered + rows * s.logit_width * 4


def estimate(size: ModelSize, s: Setup, runtime_gib: float) -> dict[str, float]:
    """Bytes per device for each term (GiB), plus their total under "total"."""
    c = s.compute_bytes
    sharded, backend = _sharded(s), _terms(s)
    shard_state = s.dp if _sharded(s, "optimizer") else 1
    terms: dict[str, float] = {}

    # -- weights ------------------------------------------------------------------------------------------
    # FSDP2 cpu offload / ZeRO-3 offload_param: the shards live in CPU memory (see host_bytes)
    terms["weights"] = 0.0 if s.offload and sharded else _weight_bytes(size, s)
    if sharded:  # the unsharded copies in flight: the root unit all forward, a layer and the next one prefetched
        layer_bytes = nf4_bytes_per_value() if s.quant_bits and backend.quantized_shards else c
        gathered = size.root_params * c + 2 * size.largest_layer_params * layer_bytes
        terms["gathered_layers"] = gathered + size.largest_layer_params * 4 * (s.method == "full")
    if s.quant_bits:  # a 4/8-bit linear layer is dequantized for its matmul
        terms["dequantized_linear"] = size.largest_linear_params * c
    # -- optimizer ---------------------------------------------------------------------------------------------
    terms["optimizer"] = 0.0 if s.offload else _optimizer_bytes(s)
    if s.frozen_copies:
        ref_bytes = backend.frozen_bytes or c
        terms["reference_model"] = s.frozen_copies * size.num_params * ref_bytes / (s.dp if sharded else 1)
    # -- what one step allocates and frees ------------------------------------------------------------------
    layers = size.num_layers if s.graph_layers is None else s.graph_layers
    logits = _logits(size, s)
    if s.checkpointing:  # layer inputs kept; one layer is recomputed at a time, after the logits are freed
        kept, recomputed = s.tokens * layers * checkpoint_bytes(size, s), s.tokens * layer_activation_bytes(size, s)
        activations = kept + max(0.0, recomputed - logits)
    else:
        activations = s.tokens * layers * layer_activation_bytes(size, s)
    dynamic = {"activations": activations + s.tokens * size.hidden_size * 8}  # + embeddings out, final norm
    if s.attention_mask:  # a 4-D mask built once per forward (padded rows, or packed rows kept apart)
        dynamic["attention_mask"] = s.rows * s.seq_len**2 * c
    dynamic["logits"] = logits
    # A reference's logits and fp32 copy. Its forward now runs in the stage's `prepare`, before the policy's, so
    # the two do not coexist: counting them together is an upper bound (kept while the plan-accuracy figures
    # were measured this way)
    if s.frozen_forward:
        ref_tokens = min(s.tokens, chunk_size(s.logit_width)) if s.chunked_logits else s.tokens
        ref_tokens = s.rows * s.new_tokens if s.new_tokens else ref_tokens
        dynamic["reference_logits"] = ref_tokens * s.logit_width * (c + (4 if c < 4 else 0))
    if s.quant_bits:  # a 4/8-bit linear layer is dequantized for its matmul
        dynamic["dequantized_linear"] = size.largest_linear_params * c
    # Gradients grow as the backward frees activations, and the step frees them again: with one micro-batch per
    # step only what exceeds the freed activations adds; with accumulation they stay while the next
    # micro-batch's activations build up.
    grads = _gradient_bytes(s)
    step_temp = s.trainable * 4 / shard_state if not s.on_cpu else 0.0  # foreach AdamW's intermediate on GPU
    transient = sum(dynamic.values())
    dynamic["gradients"] = grads if s.accumulation > 1 else max(0.0, grads + step_temp - transient)
    terms.update(dynamic)
    if s.new_tokens:
        terms["rollout"] = max(0.0, _generation_bytes(size, s, sharded) - sum(dynamic.values()))
    if s.on_cpu:
        uncheckpointed = s.tokens * layers * layer_activation_bytes(size, s)
        terms["allocator_slack"] = cpu_allocator_slack(sum(dynamic.values()), terms["optimizer"], uncheckpointed, s)
    out = {k: v / GIB for k, v in terms.items()}
    out["runtime"] = runtime_gib
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}
