"""strategy megatron's model mapping, one process: HF configs → megatron-core configs and refusals, HF weights ↔
megatron shards bit-exactly (TP and PP simulated with the pure functions), and fp32 logits equal to HF's through
the CPU shim for every family."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL

pytest.importorskip("megatron.core")

from lf_dist.parallel.megatron import model_map, weights  # noqa: E402

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# family → (config class name, extra config keys); every model has hidden 64, 4 heads, 2 layers
FAMILIES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 4}),
    "llama_gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama_tied": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama3_rope": (
        "LlamaConfig",
        {"num_key_value_heads": 2, "max_position_embeddings": 16384, "rope_parameters": LLAMA3_ROPE},
    ),
    "llama_4layers": ("LlamaConfig", {"num_key_value_heads": 2, "num_hidden_layers": 4}),
    "llama_vocab1170": ("LlamaConfig", {"num_key_value_heads": 2, "vocab_size": 1170}),  # padded under TP 4
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 1, "sliding_window": None}),
}


def tiny_config(family: str, **overrides):
    import transformers
    from transformers import AutoTokenizer

    name, extra = FAMILIES[family]
    values = dict(
        vocab_size=len(AutoTokenizer.from_pretrained(TINY_MODEL)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    )
    values.update(extra, **overrides)
    return getattr(transformers, name)(**values)


def save_tiny(family: str, path: Path) -> Path:
    """A random tiny model of `family` in fp32, every weight random (biases and norms too, so a swapped or dropped
    tensor changes the logits), saved with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(sum(map(ord, family)))
    model = AutoModelForCausalLM.from_config(tiny_config(family)).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = name.endswith("norm.weight")
            param.copy_(1 + 0.1 * torch.randn_like(param) if is_norm else 0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(path)
    return path


def hf_state_dict(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def assert_same_state_dict(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert different == []


# --- config mapping and refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, groups, kv_channels, qkv_bias, qk_norm",
    [("llama_gqa", 2, 16, False, False), ("qwen2", 2, 16, True, False), ("qwen3", 2, 32, False, True)]
    + [("mistral", 1, 16, False, False)],
)
def test_transformer_config_carries_each_familys_attention_shape(family, groups, kv_channels, qkv_bias, qk_norm):
    config = tiny_config(family)
    tc = model_map.transformer_config(config, tp=2, pp=1, bf16=True, recompute_granularity="selective")
    assert (tc.num_query_groups, tc.kv_channels, tc.add_qkv_bias, tc.qk_layernorm) == (
        groups,
        kv_channels,
        qkv_bias,
        qk_norm,
    )
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size, tc.num_attention_heads) == (2, 64, 128, 4)
    assert (tc.normalization, tc.layernorm_epsilon, tc.gated_linear_unit, tc.add_bias_linear) == (
        "RMSNorm",
        1e-5,
        True,
        False,
    )
    assert tc.activation_func is torch.nn.functional.silu
    assert (tc.hidden_dropout, tc.attention_dropout, tc.use_cpu_initialization, tc.perform_initialization) == (
        0.0,
        0.0,
        True,
        False,
    )
    assert (tc.tensor_model_parallel_size, tc.bf16, tc.recompute_granularity) == (2, True, "selective")


def test_rope_arguments_carry_theta_and_llama3_scaling_factor():
    assert model_map.rope_kwargs(tiny_config("llama")) == {"position_embedding_type": "rope", "rotary_base": 10000.0}
    assert model_map.rope_kwargs(tiny_config("llama3_rope")) == {
        "position_embedding_type": "rope",
        "rotary_base": 500000.0,
        "rope_scaling": True,
        "rope_scaling_factor": 8.0,
    }


def test_local_layer_spec_uses_rmsnorm_and_qk_norm_only_for_qwen3():
    qwen3 = model_map.layer_spec(tiny_config("qwen3"), use_te=False).submodules.self_attention.submodules
    llama = model_map.layer_spec(tiny_config("llama"), use_te=False).submodules.self_attention.submodules
    assert qwen3.q_layernorm.__name__ == "WrappedTorchNorm"
    assert llama.q_layernorm.__name__ == "IdentityOp"
    assert model_map.uses_te() is False  # Transformer Engine is not installed on the CPU test machine


REFUSALS = [
    ("llama", {"model_type": "gemma"}, (1, 1, None), "model_type='gemma'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, (1, 1, None), "'yarn'"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0}}, (1, 1, None), "low_freq_factor=2.0"),
    (
        "llama",
        {"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
        (1, 1, None),
        "original_max_position_embeddings=4096",
    ),
    ("llama", {"attention_bias": True}, (1, 1, None), "attention_bias=true"),
    ("llama", {"mlp_bias": True}, (1, 1, None), "mlp_bias=true"),
    ("llama", {"hidden_act": "gelu"}, (1, 1, None), "hidden_act='gelu'"),
    ("mistral", {"sliding_window": 4096}, (1, 1, None), "sliding_window=4096"),
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 512, "layer_types": ["sliding_attention"] * 2},
        (1, 1, None),
        "sliding_window=512",
    ),
    ("llama", {"num_attention_heads": 6, "num_key_value_heads": 6}, (4, 1, None), "num_attention_heads=6"),
    ("llama", {"num_attention_heads": 12, "num_key_value_heads": 3}, (2, 1, None), "num_key_value_heads=3"),
    ("llama", {}, (1, 4, None), "num_hidden_layers=2"),
    ("llama", {}, (1, 2, 2), "virtual_pipeline_model_parallel_size 2"),
]


@pytest.mark.parametrize("family, change, layout, words", REFUSALS, ids=[r[3] for r in REFUSALS])
def test_check_model_refuses_with_the_key_and_a_fix(family, change, layout, words):
    config = copy.deepcopy(tiny_config(family))
    for key, value in change.items():
        setattr(config, key, value)
    problem = model_map.check_model(config, *layout)
    assert problem is not None and words in problem
    assert "\n" not in problem
    assert any(fix in problem for fix in ("another strategy", "choose", "config.json"))


@pytest.mark.parametrize(
    "family, layout",
    [("llama_gqa", (4, 1, None)), ("mistral", (1, 2, None)), ("qwen2", (2, 2, None))]
    + [("llama_4layers", (1, 2, 2)), ("llama3_rope", (2, 1, None))],
)
def test_check_model_accepts_supported_layouts(family, layout):
    # KV heads 2 under TP 4 is allowed: megatron all-gathers the fused QKV output when groups divide the TP size
    assert model_map.check_model(tiny_config(family), *layout) is None


def test_sliding_window_is_accepted_when_every_sequence_fits_inside_it():
    config = tiny_config("mistral", sliding_window=1024)
    assert model_map.check_model(config, 1, 1, None, max_seq_len=1024) is None
    assert "sliding_window=1024" in model_map.check_model(config, 1, 1, None, max_seq_len=1025)


# --- weights: pure split and merge ------------------------------------------------------------------------------


def test_fused_qkv_stacks_each_groups_query_heads_then_its_key_then_its_value():
    config = tiny_config("llama_gqa")  # 4 heads of 16, 2 KV groups
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    fused = weights.fuse_qkv(q, k, v, config)
    expected = torch.cat([q[:32], k[:16], v[:16], q[32:], k[16:], v[16:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(weights.split_qkv(fused, config), (q, k, v)))


def test_fc1_shard_is_this_ranks_gate_rows_then_its_up_rows():
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    shards = [weights.shard_fc1(gate, up, r, 4) for r in range(4)]
    assert torch.equal(shards[1], torch.cat([gate[32:64], up[32:64]]))
    merged = weights.merge_fc1(shards)
    assert torch.equal(merged[0], gate) and torch.equal(merged[1], up)


def _split_and_merge(sd: dict, config, tp: int, pp: int, te: bool = False) -> dict:
    layers = list(range(config.num_hidden_layers))
    per_stage = len(layers) // pp
    out = {}
    for stage in range(pp):
        numbers = layers[stage * per_stage : (stage + 1) * per_stage]
        flags = (stage == 0, stage == pp - 1)
        shards = [weights.hf_to_megatron(sd, config, r, tp, numbers, *flags, te=te) for r in range(tp)]
        out.update(weights.megatron_to_hf(shards, config, numbers, *flags, te=te))
    return out


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_split_then_merge_returns_the_hf_weights_bit_exactly(tmp_path_factory, family, tp, pp):
    path = save_tiny(family, tmp_path_factory.getbasetemp() / family)
    sd, config = hf_state_dict(path), tiny_config(family)
    assert_same_state_dict(_split_and_merge(sd, config, tp, pp), sd)


def test_te_names_fuse_the_layer_norms_and_round_trip(tmp_path_factory):
    path = save_tiny("qwen3", tmp_path_factory.getbasetemp() / "qwen3")
    sd, config = hf_state_dict(path), tiny_config("qwen3")
    shard = weights.hf_to_megatron(sd, config, 0, 2, [0, 1], True, True, te=True)
    assert torch.equal(
        shard["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"],
        sd["model.layers.1.post_attention_layernorm.weight"],
    )
    assert torch.equal(
        shard["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
        sd["model.layers.0.input_layernorm.weight"],
    )
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in shard)
    assert_same_state_dict(_split_and_merge(sd, config, 2, 2, te=True), sd)


def test_shards_have_megatrons_shapes_and_the_vocab_padding_is_zero():
    config = tiny_config("llama_gqa", vocab_size=1170)  # 1170 rows → 1172 under TP 4
    sd = {k: v for k, v in _random_hf_sd(config).items()}
    shards = [weights.hf_to_megatron(sd, config, r, 4, [0, 1], True, True) for r in range(4)]
    assert shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 16 // 4, 64)
    assert shards[0]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128 // 4, 64)
    assert shards[0]["decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 16)
    assert [s["embedding.word_embeddings.weight"].shape[0] for s in shards] == [293] * 4
    assert torch.count_nonzero(shards[3]["output_layer.weight"][-2:]) == 0
    assert_same_state_dict(weights.megatron_to_hf(shards, config, [0, 1], True, True), sd)


def _random_hf_sd(config) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().state_dict()


class _CountingSource(weights._DictSource):
    """An in-memory checkpoint that counts the elements each read returns (as the safetensors reader would)."""

    def __init__(self, sd):
        super().__init__(sd)
        self.read_numel = 0

    def read(self, name, dim=0, start=None, stop=None):
        part = super().read(name, dim, start, stop)
        self.read_numel += part.numel()
        return part


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "mistral"])
def test_each_of_four_tp_ranks_reads_a_quarter_of_every_split_tensor(family):
    config = tiny_config(family)  # 2 or 1 KV heads: TP 4 splits inside a KV group
    sd = _random_hf_sd(config)
    split = [(n, k, hf) for n, k, hf in weights.entries(config, [0, 1], True, True) if k != "replicated"]
    total = sum(sd[h].numel() for _, _, hf in split for h in hf)
    reads = []
    for rank in range(4):
        source = _CountingSource(sd)
        for _, kind, hf in split:
            weights._read_shard(source, kind, hf, config, rank, 4)
        reads.append(source.read_numel)
    assert reads == [total // 4] * 4


def test_megatron_names_map_back_to_hf_names():
    config = tiny_config("qwen2")
    assert weights.megatron_param_to_hf_names("decoder.layers.1.self_attention.linear_qkv.bias", config, [6, 7]) == (
        "qkv",
        [f"model.layers.7.self_attn.{p}_proj.bias" for p in "qkv"],
    )
    assert weights.megatron_param_to_hf_names("decoder.layers.0.mlp.linear_fc1.weight", config) == (
        "fc1",
        ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"],
    )
    assert weights.megatron_param_to_hf_names("output_layer.weight", config) == ("vocab", ["lm_head.weight"])
    assert weights.megatron_param_to_hf_names("decoder.layers.0.self_attention.q_layernorm.weight", config) is None


# --- the real GPTModel on CPU (TP = PP = 1) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_world():
    from tests import megatron_shim

    megatron_shim.init_parallel(tp=1, pp=1)
    yield
    megatron_shim.destroy()
    megatron_shim.deactivate()


def _megatron_logits(path: Path, config, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    tconfig = model_map.transformer_config(config, tp=1, pp=1)
    chunks = model_map.build_model_chunks(config, tconfig)
    weights.load_hf_weights(chunks, config, path)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        logits = chunks[0](ids, positions, attention_mask=None)
    return logits[..., : config.vocab_size], chunks


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "llama_tied", "llama3_rope", "qwen2", "qwen3", "mistral"])
def test_megatron_logits_equal_hf_and_weights_round_trip(megatron_world, tmp_path_factory, family):
    path = save_tiny(family, tmp_path_factory.getbasetemp() / family)
    config = tiny_config(family)
    ids = torch.randint(0, config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    logits, chunks = _megatron_logits(path, config, ids)
    assert (logits - _hf_logits(path, ids)).abs().max().item() < 1e-5
    assert_same_state_dict(weights.gather_hf_state_dict(chunks, config), hf_state_dict(path))


def test_load_reads_a_sharded_checkpoint_through_its_index(megatron_world, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2")
    AutoModelForCausalLM.from_config(config).float().save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    chunks = model_map.build_model_chunks(config, model_map.transformer_config(config, tp=1, pp=1))
    weights.load_hf_weights(chunks, config, tmp_path)
    assert_same_state_dict(weights.gather_hf_state_dict(chunks, config), hf_state_dict(tmp_path))


def test_llama3_rope_scaling_is_what_makes_the_logits_match(megatron_world, tmp_path_factory):
    path = save_tiny("llama3_rope", tmp_path_factory.getbasetemp() / "llama3_rope")
    unscaled = tiny_config("llama3_rope", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    ids = torch.randint(0, unscaled.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    logits, _ = _megatron_logits(path, unscaled, ids)
    assert (logits - _hf_logits(path, ids)).abs().max().item() > 1e-3
