"""strategy megatron's memory per GPU, term by term, on the worst pipeline stage (megatron-core 0.16.1).

What megatron-core allocates, per rank of a TP × PP × CP × DP layout:
- weights: each stage holds layers/PP decoder layers, their linear weights split over TP; the first stage the
  word embeddings and the last the output layer (a tied model keeps a copy there), vocabulary ÷ TP. Parameters
  are in the compute dtype (LoRA's adapters too);
- gradients: DDP's grad buffer of the trainable parameters in fp32 (`grad_reduce_in_fp32`; the optimizer then
  reads `main_grad` without a copy), whole on every data-parallel rank;
- optimizer: fp32 main parameters (bf16/fp16 runs) and AdamW's two fp32 moments, ÷ DP·CP with the distributed
  optimizer (its shard of `shard_fp32_from_float16_groups`); full fine-tuning: 2 + 4 + 12 bytes per parameter,
  2 + 4 + 12/DP with it. LoRA: only the adapters have gradients and optimizer states;
- activations per token and layer are memory.py's (`layer_activation_bytes`, as measured for weights held in
  the compute dtype): the shares of the query, keys and values (over the KV heads), attention output and MLP
  are split over TP, the rest (norms, the residual stream, the linear layers' inputs) only with sequence
  parallelism. Without Transformer Engine megatron's own attention (`DotProductAttention`) keeps the fp32
  softmax and the probabilities of every head, heads/TP × cutoff_len values per token, and holds one layer's
  scores in a global buffer; selective recompute drops that core, full recompute keeps each layer's input
  (memory.py's `checkpoint_bytes`) and recomputes a group of layers at a time;
- 1F1B keeps min(PP - rank, micro-batches) micro-batches in flight on a stage (interleaved: 2(PP - rank - 1) +
  (VPP - 1)·PP + 1 chunks of layers/(PP·VPP) layers), so the first stage holds the most;
- logits at the last stage: vocab-parallel cross-entropy over vocabulary/TP in fp32 (memory.py's `logit_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lf_dist.parallel.megatron import runtime, settings
from lf_dist.parallel.megatron.settings import Layout
from lf_dist.parallel.registry import BACKENDS, get_backend
from lf_dist.planner.kernel_choice import Kernels
from lf_dist.planner.memory import GIB, Setup, checkpoint_bytes, layer_activation_bytes, logit_bytes
from lf_dist.planner.model_size import ModelSize

FP32 = 4


def is_megatron(strategy: str) -> bool:
    """The backend whose refusals are megatron's settings (the registry names it; the planner does not)."""
    spec = get_backend(strategy)
    return spec.check is not None and spec.hook("check") is settings.refusal


def megatron_backend():
    return next(spec for spec in BACKENDS.values() if is_megatron(spec.name))


@dataclass(frozen=True)
class Parallel:
    """How one megatron run holds the model: its layout and the settings that change what a rank keeps."""

    layout: Layout
    sequence_parallel: bool
    distributed_optimizer: bool
    fused: bool  # Transformer Engine's layers: fused (flash) attention and FusedAdam
    recompute: str | None = None  # None | selective | full
    recompute_method: str | None = None  # uniform | block (full)
    recompute_layers: int | None = None  # layers per group (uniform) or recomputed per stage (block)
    chosen: bool = False  # the planner chose the layout (strategy auto), not the config

    @classmethod
    def of(cls, cfg, world: int, on_gpu: bool, layout: Layout | None = None) -> Parallel:
        """The config's layout (or the planner's `layout`) on a machine with CUDA when `on_gpu`: the distributed
        optimizer's default is on with CUDA and DP > 1 (`settings.distributed_optimizer` on the profile's
        machine); sequence parallelism runs on Transformer Engine only, so the planner turns it on for a layout of
        its own where this machine has it, as the run's refusals read it here too."""
        t, fused = cfg.train, runtime.has_transformer_engine()
        chosen = layout is not None
        layout = layout or Layout.of(cfg, world)
        distopt = bool(t.use_distributed_optimizer) if t.use_distributed_optimizer is not None else on_gpu
        sequence_parallel = t.sequence_parallel or (chosen and fused and layout.tp > 1)
        return cls(layout, bool(sequence_parallel), distopt and layout.dp > 1, fused, chosen=chosen)

    def with_recompute(self, checkpointing, cfg) -> Parallel:
        """The planner's checkpointing as megatron's recompute: True is full recompute (the config's method and
        layers where it sets full, else each layer's input kept), False none, a granularity itself."""
        granularity = "full" if checkpointing is True else (checkpointing or None)
        method, layers = None, None
        if granularity == "full":
            given = cfg.train.recompute_granularity == "full"
            method = cfg.train.recompute_method if given else "uniform"
            layers = cfg.train.recompute_num_layers if given else 1
        return replace(self, recompute=granularity, recompute_method=method, recompute_layers=layers)

    def describe_recompute(self) -> str:
        if self.recompute == "full":
            return f"recompute full ({self.recompute_method}, recompute_num_layers {self.recompute_layers})"
        return "recompute selective (the attention core)" if self.recompute else "recompute off"

    def record(self, cfg) -> dict:
        """What the plan records and `Plan.resolve` hands to the run."""
        lay, t = self.layout, cfg.train
        return {
            "tensor_model_parallel_size": lay.tp,
            "pipeline_model_parallel_size": lay.pp,
            "virtual_pipeline_model_parallel_size": lay.vpp,
            "context_parallel_size": lay.cp,
            "data_parallel_size": lay.dp,
            "sequence_parallel": self.sequence_parallel,
            "use_distributed_optimizer": self.distributed_optimizer,
            "recompute_granularity": self.recompute,
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_layers,
            "global_batch_size": lay.dp * t.per_device_train_batch_size * t.gradient_accumulation_steps,
            "chosen_by_plan": self.chosen,
            "transformer_engine": self.fused,
        }


def layouts(model_config, world: int, per_node: int) -> list[Layout]:
    """The layouts the planner tries, smallest TP·PP first and, at the same size, wider TP (within a node, where
    its all-reduces stay on NVLink) before more stages; those megatron can split the model over (`check_model`:
    TP dividing the heads, the KV heads a multiple or divisor of it, PP dividing the layers). TP·PP = 1 is data
    parallelism alone, FSDP2's ground."""
    from lf_dist.parallel.megatron.model_map import check_model

    layers = int(model_config.num_hidden_layers)
    tps = [2**i for i in range(int(math.log2(max(per_node, 1))) + 1)]
    found = [
        Layout(tp, pp, None, 1, world // (tp * pp))
        for tp in tps
        for pp in range(1, layers + 1)
        if 1 < tp * pp <= world and world % (tp * pp) == 0 and not check_model(model_config, tp, pp, None)
    ]
    return sorted(found, key=lambda lay: (lay.tp * lay.pp, lay.pp))


def refusal(cfg, world: int, stage, model_config, layout: Layout | None = None) -> str | None:
    """Why megatron could not run `cfg` on `world` ranks of a CUDA machine (one line), or None: the registry's
    checks and `settings.refusal` for a GPU machine, so that a GPU profile is planned from any machine, with the
    model split over `layout` (the config's by default)."""
    problem = replace(megatron_backend(), check=None).refusal(cfg, world)
    return problem or settings.refusal(cfg, world, stage, model_config, layout, cuda=True)


def _stage_params(size: ModelSize, lay: Layout) -> float:
    """Parameters of the worst stage: its layers ÷ TP and one vocabulary-sized matrix ÷ TP (embeddings first,
    output layer or the tied copy last); the whole model ÷ TP on one stage."""
    layers = size.num_layers // lay.pp * size.largest_layer_params
    if lay.pp == 1:
        return (size.num_params - size.num_layers * size.largest_layer_params + layers) / lay.tp
    return (layers + size.vocab_size * size.hidden_size) / lay.tp


def _per_layer(size: ModelSize, s: Setup, par: Parallel) -> tuple[float, float]:
    """(kept, attention core) bytes per token and layer without recompute, on one rank. `s` is priced as memory.py
    measures weights held in the compute dtype (its LoRA figures): megatron's weights, trained or not, are bf16."""
    c, tp = s.compute_bytes, par.layout.tp
    q_size = size.num_heads * size.head_dim
    # keys and values split over the KV heads; past them (TP > KV heads) each rank keeps its own group whole
    kv = 2 * c * size.kv_size / min(tp, size.num_kv_heads)
    split = 4 * c * size.intermediate_size + 2 * c * q_size  # the MLP; the query and the attention output
    replicated = layer_activation_bytes(size, s) - 2 * c * size.kv_size - split
    kept = replicated / (tp if par.sequence_parallel else 1) + split / tp + kv
    if par.fused:
        return kept, 0.0
    # megatron's own attention: the fp32 softmax and the probabilities of every head, keys and values repeated
    # to every query head
    return kept, ((FP32 + c) * size.num_heads * s.seq_len + 2 * c * q_size) / tp - kv


def _in_flight(lay: Layout, accumulation: int, rank: int) -> tuple[int, int]:
    """(chunks of a micro-batch's layers stage `rank` holds at once, layers per chunk): 1F1B's warm-up plus one,
    at most every micro-batch of the step; interleaved, 2(PP - rank - 1) + (VPP - 1)·PP + 1 chunks."""
    if lay.pp == 1:
        return 1, 1
    if not lay.vpp:
        return min(accumulation, lay.pp - rank), lay.pp
    chunks = min(accumulation * lay.vpp, 2 * (lay.pp - rank - 1) + (lay.vpp - 1) * lay.pp + 1)
    return chunks, lay.pp * lay.vpp


def _kept_per_layer(size: ModelSize, s: Setup, par: Parallel) -> tuple[float, float]:
    """(bytes kept per token and layer of a micro-batch, bytes per token of the layers recomputed at once)."""
    kept, core = _per_layer(size, s, par)
    if par.recompute == "selective":
        return kept, core
    if par.recompute != "full":
        return kept + core, 0.0
    ckpt = checkpoint_bytes(size, s) / (par.layout.tp if par.sequence_parallel else 1)
    chunk = size.num_layers // (par.layout.pp * (par.layout.vpp or 1))  # what megatron's recompute counts in
    n = min(par.recompute_layers or 1, chunk)
    if par.recompute_method == "block":  # the first n layers of a chunk recomputed one by one, the rest kept
        return (n * ckpt + (chunk - n) * (kept + core)) / chunk, kept + core
    return math.ceil(chunk / n) * ckpt / chunk, n * (kept + core)  # uniform: each group of n keeps its input


def _stage(size: ModelSize, s: Setup, par: Parallel, rank: int, runtime_gib: float) -> dict[str, float]:
    lay, c = par.layout, s.compute_bytes
    params = _stage_params(size, lay)
    adapters = s.trainable / (lay.tp * lay.pp) if s.method != "full" else 0.0
    trainable = params if s.method == "full" else adapters
    shards = lay.dp * lay.cp if par.distributed_optimizer else 1
    master = FP32 if c < FP32 else 0
    terms = {
        "weights": (params + adapters) * c,
        "gradients": trainable * FP32,
        "optimizer": trainable * (master + s.optimizer_bytes) / shards,
    }
    tokens = s.tokens / lay.cp
    per_layer, recomputed = _kept_per_layer(size, replace(s, method="lora"), par)
    sp = lay.tp if par.sequence_parallel else 1
    chunks, split = _in_flight(lay, s.accumulation, rank)
    layers = chunks * size.num_layers // split
    kept = tokens * (layers * per_layer + chunks * size.hidden_size * 8 / sp)  # + embeddings out, final norm
    last = rank == lay.pp - 1
    logits = tokens * s.logit_width / lay.tp * logit_bytes(c) if last else 0.0
    # one group is recomputed at a time in the backward, after the last stage's logits are freed
    terms["activations"] = kept + max(0.0, tokens * recomputed - logits)
    terms["logits"] = logits
    step = 0.0 if par.fused else trainable * FP32 / shards  # torch's foreach AdamW (no TE FusedAdam)
    terms["optimizer_step"] = max(0.0, step - terms["activations"] - logits)
    if not par.fused:  # megatron's global buffer for the attention scores' matmul: one layer's, kept all run
        terms["attention_buffer"] = s.rows * size.num_heads / lay.tp * s.seq_len**2 * c
    out = {k: v / GIB for k, v in terms.items()}
    out["runtime"] = runtime_gib
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


def estimate(size: ModelSize, s: Setup, par: Parallel, runtime_gib: float) -> dict[str, float]:
    """GiB per GPU on the stage that needs the most (the first holds the most micro-batches, the last the
    logits), term by term, with their total under "total"."""
    ranks = sorted({0, par.layout.pp - 1}, reverse=True)  # the last stage first: it shows the logits on a tie
    return max((_stage(size, s, par, r, runtime_gib) for r in ranks), key=lambda m: m["total"])


def kernels(cfg, par: Parallel) -> Kernels:
    """megatron runs its own layers: lf-dist's attention choice, padding-free rows, Liger and the fused AdamW do
    not apply."""
    attention = (
        "Transformer Engine's fused attention"
        if par.fused
        else "megatron's own attention (no Transformer Engine here): the scores of every head are kept"
    )
    return Kernels(
        attention="auto",
        padding_free=False,
        cross_entropy="vocab-parallel",
        liger=False,
        torch_compile=False,
        optim=cfg.train.optim,
        reasons=[
            f"megatron's own layers: flash-attn, Liger, torch.compile and lf-dist's kernels are not applied; "
            f"attention: {attention}",
            "cross-entropy vocab-parallel: logits over vocabulary/TP in fp32 at the last pipeline stage",
        ],
    )


def figures(mem: dict) -> str:
    """The largest terms of a memory estimate, for a reason line."""
    shown = sorted(((k, v) for k, v in mem.items() if k not in ("total", "host") and v >= 0.01), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.2f}" for k, v in shown[:4]) + " GiB"
