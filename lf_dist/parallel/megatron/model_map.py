"""A Hugging Face Llama, Mistral, Qwen2 or Qwen3 config as megatron-core's TransformerConfig and GPTModel chunks.

`check_model` says in one line why a config cannot be mapped (read when the run is planned); the other functions
import megatron-core and are called on the ranks. The mapping matches HF's forward exactly: RMSNorm, SwiGLU,
grouped-query attention, rotate-half RoPE (Llama-3 scaling included), Qwen2's QKV bias and Qwen3's qk-norm.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# megatron-core's RotaryEmbedding._apply_scaling hard-codes these Llama-3 constants; only `factor` is a parameter
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def rope_parameters(hf_config) -> dict:
    """The config's rope dict (transformers 5 `rope_parameters`; older configs' rope_theta/rope_scaling)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def padded_vocab_size(hf_config, tp: int) -> int:
    """The vocab rounded up to a multiple of `tp` (vocab-parallel layers split it evenly); the extra rows are zero."""
    return math.ceil(hf_config.vocab_size / tp) * tp


def _sliding_window(hf_config) -> int | None:
    """The window HF applies in some layer, or None (Qwen2/Qwen3 only in `sliding_attention` layers)."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or hf_config.model_type == "mistral":
        return window
    if not getattr(hf_config, "use_sliding_window", False):
        return None
    layer_types = getattr(hf_config, "layer_types", None) or []
    return window if "sliding_attention" in layer_types else None


def _rope_refusal(hf_config) -> str | None:
    params = rope_parameters(hf_config)
    kind = params["rope_type"]
    if kind not in ("default", "llama3"):
        return (
            f"rope_parameters.rope_type={kind!r} is not supported by strategy megatron (megatron-core's RoPE "
            "implements 'default' and 'llama3' only); train this model with another strategy"
        )
    if getattr(hf_config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial_rotary_factor != 1 is not supported by strategy megatron; train with another strategy"
    if kind == "llama3":
        for key, value in LLAMA3_ROPE_CONSTANTS.items():
            if float(params.get(key, value)) != value:
                return (
                    f"rope_parameters.{key}={params.get(key)} differs from the {value} megatron-core's Llama-3 "
                    "RoPE scaling hard-codes; train this model with another strategy"
                )
    return None


def _family_refusal(hf_config) -> str | None:
    kind = getattr(hf_config, "model_type", None)
    if kind not in FAMILIES:
        return (
            f"model_type={kind!r} is not supported by strategy megatron (it maps {', '.join(FAMILIES)}); "
            "train this model with another strategy"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        return (
            f"hidden_act={hf_config.hidden_act!r} is not supported by strategy megatron (its MLP is SwiGLU with "
            "silu); train this model with another strategy"
        )
    # megatron's add_qkv_bias covers exactly Qwen2's q/k/v biases; HF attention_bias also biases o_proj
    if getattr(hf_config, "attention_bias", False) and kind != "qwen2":
        return (
            f"{kind} attention_bias=true is not supported by strategy megatron (it biases o_proj as well, which "
            "megatron-core cannot without biasing the MLP); train this model with another strategy"
        )
    if getattr(hf_config, "mlp_bias", False):
        return (
            f"{kind} mlp_bias=true is not supported by strategy megatron (megatron-core cannot bias the MLP without "
            "biasing o_proj); train this model with another strategy"
        )
    return None


def _layout_refusal(hf_config, tp: int, pp: int, vpp: int | None) -> str | None:
    heads, groups = hf_config.num_attention_heads, kv_heads(hf_config)
    if heads % tp:
        return f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp}; choose a divisor"
    # transformer_config.py: num_query_groups must be a multiple or a divisor of the TP size (below it, each
    # rank all-gathers the fused QKV output and keeps its own query heads)
    if groups % tp and tp % groups:
        return (
            f"num_key_value_heads={groups} must be a multiple or a divisor of tensor_model_parallel_size={tp}; "
            "choose tensor_model_parallel_size accordingly"
        )
    stages = pp * (vpp or 1)
    if hf_config.num_hidden_layers % stages:
        return (
            f"num_hidden_layers={hf_config.num_hidden_layers} is not divisible by pipeline_model_parallel_size "
            f"{pp} × virtual_pipeline_model_parallel_size {vpp or 1}; choose sizes that divide it"
        )
    return None


def check_model(hf_config, tp: int, pp: int, vpp: int | None, max_seq_len: int | None = None) -> str | None:
    """Why `hf_config` cannot run under strategy megatron at this layout, in one line naming the key and the fix;
    None where it can. A sliding window is accepted when `max_seq_len` (the longest sequence) fits inside it."""
    problem = _family_refusal(hf_config) or _rope_refusal(hf_config)
    if problem:
        return problem
    window = _sliding_window(hf_config)
    if window is not None and (max_seq_len is None or max_seq_len > window):
        return (
            f"sliding_window={window} is not supported by strategy megatron (its attention is full causal); set "
            "sliding_window: null (Mistral) or use_sliding_window: false (Qwen) in config.json, or keep "
            f"cutoff_len <= {window}"
        )
    return _layout_refusal(hf_config, tp, pp, vpp)


def transformer_config(
    hf_config,
    *,
    tp: int,
    pp: int,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    cp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    **extra,
):
    """megatron-core's TransformerConfig for `hf_config`; `extra` (recompute, bf16, loss settings...) overrides."""
    from megatron.core.transformer import TransformerConfig

    # the sliding window is judged against the sequence length when the run is planned (check_model)
    problem = _family_refusal(hf_config) or _rope_refusal(hf_config) or _layout_refusal(hf_config, tp, pp, vpp)
    if problem:
        raise ValueError(problem)
    values = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=kv_heads(hf_config),
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        context_parallel_size=cp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype if pp > 1 else None,
        use_cpu_initialization=True,
        # the weights come from the checkpoint (load_hf_weights); random init would only be overwritten
        perform_initialization=False,
        # the fused kernels are CUDA extensions the local spec may lack; TE fuses what matters itself
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    values.update(extra)
    return TransformerConfig(**values)


def uses_te() -> bool:
    """Whether Transformer Engine can be imported (its layer spec is used then)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(hf_config, use_te: bool):
    """The transformer layer spec: Transformer Engine's (norms fused into linear_qkv/linear_fc1) or the local one."""
    qk_norm = hf_config.model_type == "qwen3"
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")


def rope_kwargs(hf_config) -> dict:
    """GPTModel's RoPE arguments: the base, and Llama-3 scaling (megatron applies it to inv_freq at build)."""
    params = rope_parameters(hf_config)
    out = {"position_embedding_type": "rope", "rotary_base": params.get("rope_theta", 10000.0)}
    if params["rope_type"] == "llama3":
        out.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    return out


def build_model_chunks(hf_config, tconfig, use_te: bool = False) -> list:
    """This rank's GPTModel chunks, one per virtual pipeline stage, on CPU with the padded vocab."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if not use_te and (tconfig.sequence_parallel or tconfig.context_parallel_size > 1):
        # the local spec's torch RMSNorm asserts `not sequence_parallel`; its DotProductAttention asserts cp == 1
        raise ValueError("sequence_parallel and context_parallel_size > 1 need Transformer Engine's layer spec")
    vpp = tconfig.virtual_pipeline_model_parallel_size
    spec = layer_spec(hf_config, use_te)
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunk = GPTModel(
            tconfig,
            spec,
            vocab_size=padded_vocab_size(hf_config, tconfig.tensor_model_parallel_size),
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            vp_stage=vp_stage,
            **rope_kwargs(hf_config),
        )
        _zero_vocab_padding(chunk, hf_config.vocab_size)
        _mark_tensor_parallel(chunk)
        chunks.append(chunk)
    return chunks


def _mark_tensor_parallel(chunk) -> None:
    """The tensor-parallel attributes megatron-core sets only while it initializes weights (skipped here: they are
    loaded): without them the gradient norm counts a sharded weight on tensor-parallel rank 0 alone."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in chunk.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _zero_vocab_padding(chunk, vocab: int) -> None:
    """Zero the rows past the HF vocab in this rank's vocab-parallel embedding and output weights."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    weights = []
    if chunk.pre_process:
        weights.append(chunk.embedding.word_embeddings.weight)
    if chunk.post_process and getattr(chunk.output_layer, "weight", None) is not None:
        weights.append(chunk.output_layer.weight)
    with torch.no_grad():
        for weight in weights:
            start = rank * weight.shape[0]
            if start + weight.shape[0] > vocab:
                weight[max(vocab - start, 0) :].zero_()
