"""Tensor-parallel LoRA on megatron-core's layers (lf_dist/parallel/megatron/lora.py) against peft's LoRA.

Single-process tests run megatron at TP=1 on the CPU shim; the multi-process ones (slow) spawn 2 gloo ranks at
TP=2 and compare each rank's shards, reassembled here, with an unsharded peft LoRA on the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lf_dist.errors import UserError
from lf_dist.parallel.megatron.lora import HF_NAMES, megatron_lora_targets
from lf_dist.parallel.megatron.lora_peft import adapter_config

IN, OUT, R, ALPHA = 16, 24, 4, 8.0
SEQ, BATCH = 6, 2
ALL_HF = [n for names in HF_NAMES.values() for n in names]


# ---------------------------------------------------------------- target names (no megatron needed)


@pytest.mark.parametrize(
    "lora_target, expected",
    [
        ("all", ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
        ("q_proj,k_proj,v_proj,o_proj", ["linear_qkv", "linear_proj"]),
        (" down_proj , up_proj,gate_proj", ["linear_fc1", "linear_fc2"]),
        ("linear_fc2,linear_qkv", ["linear_qkv", "linear_fc2"]),
        ("q_proj,v_proj,linear_qkv", ["linear_qkv"]),
    ],
)
def test_lora_target_maps_hf_and_megatron_names_to_megatron_layers(lora_target, expected):
    assert megatron_lora_targets(lora_target) == expected


@pytest.mark.parametrize("lora_target", ["q_proj,v_proj", "gate_proj", "q_proj,k_proj,v_proj,up_proj,down_proj"])
def test_lora_target_that_splits_a_fused_layer_is_refused_in_one_line(lora_target):
    with pytest.raises(UserError) as err:
        megatron_lora_targets(lora_target)
    message = str(err.value)
    assert "\n" not in message
    assert "q_proj,k_proj,v_proj into linear_qkv" in message and "gate_proj,up_proj into linear_fc1" in message
    assert lora_target in message


@pytest.mark.parametrize("lora_target", ["lm_head", "q_proj,k_proj,v_proj,embed_tokens", ""])
def test_lora_target_without_a_megatron_layer_is_refused(lora_target):
    with pytest.raises(UserError):
        megatron_lora_targets(lora_target)


def test_adapter_config_names_the_hf_modules_of_the_megatron_targets():
    config = adapter_config(None, ["linear_qkv", "down_proj"], r=8, alpha=16, dropout=0.05, rslora=True)
    assert sorted(config.target_modules) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (8, 16, 0.05, True)
    assert sorted(adapter_config(None, ["all"], 4, 8, 0.0).target_modules) == sorted(ALL_HF)


# ---------------------------------------------------------------- helpers shared with the spawned ranks


def _full_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """The unsharded numbers of one layer test: weight, adapter, input and the gradient fed into the output."""
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(OUT, IN, generator=g) / math.sqrt(IN),
        "A": torch.randn(R, IN, generator=g),
        "B": torch.randn(OUT, R, generator=g),
        "x": torch.randn(SEQ, BATCH, IN, generator=g),
        "g": torch.randn(SEQ, BATCH, OUT, generator=g),
    }


def _megatron_layer(kind: str, tp: int, sequence_parallel: bool = False, dropout: float = 0.0, rslora=False):
    """A megatron Column/RowParallelLinear holding its shard of `_full_tensors`' weight, wrapped in LoRA with its
    shard of A and B."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from lf_dist.parallel.megatron.lora import LoraParallelLinear

    config = ModelParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, use_cpu_initialization=True
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    common = dict(config=config, init_method=torch.nn.init.zeros_, bias=False, tp_group=tp_group)
    if kind == "column":
        base = ColumnParallelLinear(IN, OUT, gather_output=False, **common)
    else:
        base = RowParallelLinear(IN, OUT, input_is_parallel=True, skip_bias_add=False, **common)
    full = _full_tensors()
    rank = base.tp_group.rank()
    with torch.no_grad():
        base.weight.copy_(full["weight"].chunk(tp, dim=0 if kind == "column" else 1)[rank])
    target = "linear_qkv" if kind == "column" else "linear_proj"
    layer = LoraParallelLinear(base, target, R, ALPHA, dropout, rslora, torch.Generator().manual_seed(7))
    layer.set_full_adapter(full["A"], full["B"])
    return layer


def _peft_reference(rslora: bool = False) -> dict[str, torch.Tensor]:
    """peft's LoRA on a plain nn.Linear with `_full_tensors`: output, input gradient, adapter gradients."""
    from peft import LoraConfig, get_peft_model

    full = _full_tensors()
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(IN, OUT, bias=False))
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"], use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    proj = peft_model.base_model.model.proj
    with torch.no_grad():
        proj.base_layer.weight.copy_(full["weight"])
        proj.lora_A["default"].weight.copy_(full["A"])
        proj.lora_B["default"].weight.copy_(full["B"])
    x = full["x"].clone().requires_grad_(True)
    out = proj(x)
    (out * full["g"]).sum().backward()
    a_grad, b_grad = proj.lora_A["default"].weight.grad, proj.lora_B["default"].weight.grad
    return {"out": out.detach(), "x_grad": x.grad, "A_grad": a_grad, "B_grad": b_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def megatron_tp1():
    from tests import megatron_shim

    megatron_shim.init_parallel(tp=1)
    yield
    megatron_shim.destroy()


# ---------------------------------------------------------------- TP=1, one process


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("rslora", [False, True])
def test_tp1_megatron_lora_layer_equals_peft_lora_forward_and_grads(megatron_tp1, kind, rslora):
    full = _full_tensors()
    layer = _megatron_layer(kind, tp=1, rslora=rslora)
    x = full["x"].clone().requires_grad_(True)
    out, bias = layer(x)
    (out * full["g"]).sum().backward()
    ref = _peft_reference(rslora)
    assert bias is None
    assert _rel(out, ref["out"]) < 1e-6
    assert _rel(x.grad, ref["x_grad"]) < 1e-6
    assert _rel(layer.lora_A.grad, ref["A_grad"]) < 1e-6
    assert _rel(layer.lora_B.grad, ref["B_grad"]) < 1e-6
    assert layer.base_layer.weight.grad is not None  # this test left the base trainable; apply_lora freezes it


def test_lora_init_is_peft_kaiming_on_the_whole_A_and_zero_B(megatron_tp1):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import RowParallelLinear

    from lf_dist.parallel.megatron.lora import LoraParallelLinear

    config = ModelParallelConfig(use_cpu_initialization=True)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    base = RowParallelLinear(
        IN,
        OUT,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=tp_group,
    )
    layer = LoraParallelLinear(base, "linear_proj", R, ALPHA, 0.0, False, torch.Generator().manual_seed(3))
    expected = torch.empty(R, IN)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer.lora_A.detach(), expected)
    assert float(layer.lora_B.abs().sum()) == 0.0
    assert layer.scaling == ALPHA / R


@pytest.mark.parametrize("kind", ["column", "row"])
def test_adapter_params_carry_megatron_tensor_parallel_attributes(megatron_tp1, kind):
    layer = _megatron_layer(kind, tp=1)
    sharded, replicated = (layer.lora_B, layer.lora_A) if kind == "column" else (layer.lora_A, layer.lora_B)
    assert sharded.tensor_model_parallel is True and sharded.partition_dim == (0 if kind == "column" else 1)
    assert replicated.tensor_model_parallel is False and replicated.partition_dim == -1
    assert all(p.allreduce is True and p.partition_stride == 1 for p in (sharded, replicated))


def test_lora_on_a_layernorm_fused_column_layer_sees_the_normalized_input(megatron_tp1):
    """Transformer Engine's spec fuses the layer norm into linear_qkv/linear_fc1 (TELayerNormColumnParallelLinear);
    a stand-in with that class name and attributes, normalizing inside, gives peft's LoRA after an RMSNorm."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig
    from peft import LoraConfig, get_peft_model

    from lf_dist.parallel.megatron.lora import LoraParallelLinear

    class TELayerNormColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, IN))

        def forward(self, x):
            rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.layernorm_epsilon)
            return super().forward(x * rms * self.layer_norm_weight)

    config = TransformerConfig(
        num_layers=1,
        hidden_size=IN,
        num_attention_heads=1,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        use_cpu_initialization=True,
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    base = TELayerNormColumnParallelLinear(
        IN, OUT, config=config, init_method=torch.nn.init.zeros_, bias=False, gather_output=False, tp_group=tp_group
    )
    full = _full_tensors()
    with torch.no_grad():
        base.weight.copy_(full["weight"])
    layer = LoraParallelLinear(base, "linear_qkv", R, ALPHA, 0.0, False, torch.Generator().manual_seed(0))
    layer.set_full_adapter(full["A"], full["B"])

    reference = torch.nn.Sequential()
    reference.add_module("norm", torch.nn.RMSNorm(IN, eps=1e-5))
    reference.add_module("proj", torch.nn.Linear(IN, OUT, bias=False))
    peft_model = get_peft_model(reference, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"]))
    with torch.no_grad():
        reference.norm.weight.copy_(base.layer_norm_weight)
        reference.proj.base_layer.weight.copy_(full["weight"])
        reference.proj.lora_A["default"].weight.copy_(full["A"])
        reference.proj.lora_B["default"].weight.copy_(full["B"])
    x = full["x"].clone().requires_grad_(True)
    x_ref = full["x"].clone().requires_grad_(True)
    out, want = layer(x)[0], peft_model(x_ref)
    (out * full["g"]).sum().backward()
    (want * full["g"]).sum().backward()
    assert _rel(out, want) < 1e-6
    assert _rel(x.grad, x_ref.grad) < 1e-6
    assert _rel(layer.lora_A.grad, reference.proj.lora_A["default"].weight.grad) < 1e-6


# ---------------------------------------------------------------- TP=2, two gloo processes


def _tp2_layer_case(kind: str, sequence_parallel: bool, rank: int) -> dict:
    """One rank's part of a LoRA layer at TP=2: its output, input gradient and adapter gradients (those of
    sequence-parallel params summed over TP, as megatron's finalize_model_grads does), and megatron's L1 grad
    norm of the adapter (get_grad_norm_fp32 over the params it counts: the L2 path allocates on CUDA)."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    full = _full_tensors()
    layer = _megatron_layer(kind, tp=2, sequence_parallel=sequence_parallel)
    layer.base_layer.weight.requires_grad_(False)  # as apply_lora leaves it
    if kind == "column":
        x = full["x"].chunk(2, dim=0)[rank] if sequence_parallel else full["x"]
        g = full["g"].chunk(2, dim=-1)[rank]
    else:
        x = full["x"].chunk(2, dim=-1)[rank]
        g = full["g"].chunk(2, dim=0)[rank] if sequence_parallel else full["g"]
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * g).sum().backward()
    adapters = (layer.lora_A, layer.lora_B)
    for p in adapters:
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=layer.tp_group)
    counted = [p.grad for p in adapters if param_is_not_tensor_parallel_duplicate(p, layer.tp_group)]
    norm = get_grad_norm_fp32(counted, norm_type=1, grad_stats_parallel_group=layer.tp_group)
    grads = {"A_grad": layer.lora_A.grad.clone(), "B_grad": layer.lora_B.grad.clone()}
    return {"out": out.detach(), "x_grad": x.grad, "l1_norm": float(norm), **grads}


def _tp2_extras(rank: int) -> dict:
    """Init and checkpoint layout at TP=2, and replicated grads under dropout."""
    from lf_dist.parallel.megatron.lora import LoraParallelLinear

    out = {}
    row = _megatron_layer("row", tp=2)
    fresh = LoraParallelLinear(row.base_layer, "linear_proj", R, ALPHA, 0.0, False, torch.Generator().manual_seed(7))
    out["init_A"], out["init_B"] = fresh.full_adapter()
    column = _megatron_layer("column", tp=2)
    sharded = {**column.sharded_state_dict("col."), **row.sharded_state_dict("row.")}
    keys = ("col.lora_A", "col.lora_B", "row.lora_A", "row.lora_B")
    out["global_shapes"] = {k: tuple(sharded[k].global_shape) for k in keys}
    for kind in ("column", "row"):
        layer = _megatron_layer(kind, tp=2, dropout=0.5)
        layer.base_layer.weight.requires_grad_(False)
        full = _full_tensors()
        x = full["x"] if kind == "column" else full["x"].chunk(2, dim=-1)[rank]
        torch.manual_seed(11)  # the trainer seeds the default generator alike on every rank
        y = layer(x)[0]
        y.square().sum().backward()
        out[f"dropout_{kind}"] = (layer.lora_A.grad if kind == "column" else layer.lora_B.grad).clone()
    return out


def _tp2_layers_worker(out: str) -> None:
    from tests import megatron_shim

    megatron_shim.init_parallel(tp=2)
    rank = torch.distributed.get_rank()
    result = {(k, sp): _tp2_layer_case(k, sp, rank) for k in ("column", "row") for sp in (False, True)}
    result["extras"] = _tp2_extras(rank)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    megatron_shim.destroy()


def _spawn(target, tmp_path: Path, *args) -> list[dict]:
    from tests.megatron_run import spawn

    spawn(target, 2, str(tmp_path), *args)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def tp2_layers(tmp_path_factory):
    return _spawn(_tp2_layers_worker, tmp_path_factory.mktemp("tp2_layers"))


def _assemble(kind: str, sp: bool, ranks: list[dict]) -> dict:
    """The unsharded output / input grad / adapter grads from both ranks' parts."""
    cat = lambda key, dim: torch.cat([r[key] for r in ranks], dim=dim)  # noqa: E731
    if kind == "column":
        return {
            "out": cat("out", -1),
            "x_grad": cat("x_grad", 0) if sp else ranks[0]["x_grad"],
            "A_grad": ranks[0]["A_grad"],
            "B_grad": cat("B_grad", 0),
        }
    return {
        "out": cat("out", 0) if sp else ranks[0]["out"],
        "x_grad": cat("x_grad", -1),
        "A_grad": cat("A_grad", 1),
        "B_grad": ranks[0]["B_grad"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sequence-parallel"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_tp2_lora_layer_equals_unsharded_peft_lora(tp2_layers, kind, sequence_parallel):
    ranks = [r[(kind, sequence_parallel)] for r in tp2_layers]
    got, ref = _assemble(kind, sequence_parallel, ranks), _peft_reference()
    for key in ("out", "x_grad", "A_grad", "B_grad"):
        assert _rel(got[key], ref[key]) < 1e-5, key
    replicated = "A_grad" if kind == "column" else "B_grad"
    assert torch.equal(ranks[0][replicated], ranks[1][replicated])
    if kind == "column" and not sequence_parallel:
        assert torch.equal(ranks[0]["x_grad"], ranks[1]["x_grad"])
    if kind == "row" and not sequence_parallel:
        assert torch.equal(ranks[0]["out"], ranks[1]["out"])
    # megatron counts the replicated adapter once, not once per TP rank
    want = float(ref["A_grad"].abs().sum() + ref["B_grad"].abs().sum())
    assert ranks[0]["l1_norm"] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_tp2_lora_init_and_checkpoint_shapes_are_those_of_tp1(tp2_layers):
    extras = [r["extras"] for r in tp2_layers]
    expected = torch.empty(R, IN)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(extras[0]["init_A"], expected) and torch.equal(extras[1]["init_A"], expected)
    assert float(extras[0]["init_B"].abs().sum()) == 0.0
    assert extras[0]["global_shapes"] == {
        "col.lora_A": (R, IN),
        "col.lora_B": (OUT, R),
        "row.lora_A": (R, IN),
        "row.lora_B": (OUT, R),
    }


@pytest.mark.slow
def test_tp2_replicated_adapter_grads_agree_across_ranks_under_dropout(tp2_layers):
    extras = [r["extras"] for r in tp2_layers]
    for kind in ("column", "row"):
        grad0, grad1 = extras[0][f"dropout_{kind}"], extras[1][f"dropout_{kind}"]
        assert float(grad0.abs().sum()) > 0
        assert torch.equal(grad0, grad1), kind


# ---------------------------------------------------------------- a whole Llama at TP=2


def _llama_ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 13), generator=torch.Generator().manual_seed(5))


def _random_peft_adapter(model_dir: Path, out: Path) -> Path:
    """A peft LoRA on every linear of the HF model with random A and B; q/k/v share A, gate/up share A (megatron
    fuses them, so only such adapters have a megatron twin)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lf_dist.parallel.megatron.lora_peft import adapter_config

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, adapter_config(model.config, ["all"], R, ALPHA, 0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in peft_model.base_model.model.model.layers:
            groups = [
                [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                [layer.self_attn.o_proj],
                [layer.mlp.gate_proj, layer.mlp.up_proj],
                [layer.mlp.down_proj],
            ]
            for group in groups:
                a = torch.randn(group[0].lora_A["default"].weight.shape, generator=g) * 0.1
                for module in group:
                    module.lora_A["default"].weight.copy_(a)
                    b = module.lora_B["default"].weight
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return out


def _lora_llama(model_dir: str, adapter_dir: str, tp: int, pp: int):
    """This rank's chunks of the Llama at (tp, pp), LoRA on every layer holding the peft adapter's numbers."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lf_dist.parallel.megatron import lora, lora_peft
    from lf_dist.parallel.megatron.model_map import build_model_chunks, transformer_config
    from lf_dist.parallel.megatron.weights import load_hf_weights
    from tests import megatron_shim

    megatron_shim.init_parallel(tp=tp, pp=pp)
    hf_config = AutoConfig.from_pretrained(model_dir)
    chunks = build_model_chunks(hf_config, transformer_config(hf_config, tp=tp, pp=pp))
    load_hf_weights(chunks, hf_config, Path(model_dir))
    lora.apply_lora(chunks, lora.megatron_lora_targets("all"), R, ALPHA, 0.0)
    lora_peft.load_peft_adapter(chunks, hf_config, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    return hf_config, chunks


def _tp2_llama_worker(out: str, model_dir: str, adapter_dir: str) -> None:
    from megatron.core import parallel_state

    from lf_dist.parallel.megatron import lora, lora_peft
    from tests import megatron_shim

    hf_config, chunks = _lora_llama(model_dir, adapter_dir, tp=2, pp=1)
    ids = _llama_ids(hf_config.vocab_size)
    positions = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)
    loss = chunks[0](ids[:, :-1], positions, None, labels=ids[:, 1:]).mean()
    loss.backward()
    with torch.no_grad():
        logits = chunks[0](ids[:, :-1], positions, None)
    parts = [torch.empty_like(logits) for _ in range(2)]
    torch.distributed.all_gather(parts, logits.contiguous())
    adapter = lora_peft.gather_peft_adapter(chunks, hf_config)
    with torch.no_grad():
        for _, _, module in lora.lora_modules(chunks):
            for p in (module.lora_A, module.lora_B):
                p.copy_(p.grad)  # the gradients in the adapter's place, to export them under HF names
    grads = lora_peft.gather_peft_adapter(chunks, hf_config)
    trainable = [n for n, p in chunks[0].named_parameters() if p.requires_grad]
    # the same adapter on two pipeline stages (a layer each), gathered to rank 0 again
    parallel_state.destroy_model_parallel()
    hf_config, chunks = _lora_llama(model_dir, adapter_dir, tp=1, pp=2)
    adapter_pp2 = lora_peft.gather_peft_adapter(chunks, hf_config)
    if torch.distributed.get_rank() == 0:
        result = {"loss": float(loss), "logits": torch.cat(parts, dim=-1)[..., : hf_config.vocab_size]}
        result.update(adapter=adapter, grads=grads, trainable=trainable, adapter_pp2=adapter_pp2)
        torch.save(result, Path(out) / "rank0.pt")
    else:
        assert adapter is None and adapter_pp2 is None
    megatron_shim.destroy()


@pytest.fixture(scope="module")
def tp2_llama(tmp_path_factory):
    from tests.conftest import make_llama
    from tests.megatron_run import spawn

    root = tmp_path_factory.mktemp("tp2_llama")
    # hidden 256: 4 query heads over 2 KV groups (GQA), one group per TP rank
    model_dir = make_llama(root / "llama", hidden=256, layers=2, intermediate=256)
    adapter_dir = _random_peft_adapter(model_dir, root / "adapter")
    spawn(_tp2_llama_worker, 2, str(root), str(model_dir), str(adapter_dir))
    return model_dir, adapter_dir, torch.load(root / "rank0.pt", weights_only=False)


def _peft_llama(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


@pytest.mark.slow
def test_tp2_llama_lora_loss_and_adapter_grads_equal_peft(tp2_llama):
    model_dir, adapter_dir, result = tp2_llama
    model = _peft_llama(model_dir, adapter_dir)
    ids = _llama_ids(model.config.vocab_size)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    want = {n.replace(".default.", "."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert result["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert set(result["grads"]) == set(want) and len(want) == 2 * 7 * 2
    assert len(result["trainable"]) == 2 * 4 * 2  # A and B of 4 megatron layers in each of 2 layers; base frozen
    for name, grad in want.items():
        if ".lora_A." in name:
            # q/k/v (gate/up) share megatron's one A: its gradient is the sum of peft's three (two)
            group = "q_proj,k_proj,v_proj" if "self_attn" in name and "o_proj" not in name else "gate_proj,up_proj"
            module = name.split(".")[-3]
            if module in group.split(","):
                grad = sum(want[name.replace(module, m)] for m in group.split(","))
        assert _rel(result["grads"][name], grad) < 1e-5, name


@pytest.mark.slow
def test_tp2_llama_exported_adapter_is_the_loaded_one_and_gives_megatron_logits_in_peft(tp2_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from lf_dist.parallel.megatron.lora_peft import adapter_config

    model_dir, adapter_dir, result = tp2_llama
    original = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for exported in (result["adapter"], result["adapter_pp2"]):  # TP=2, and PP=2 with a layer per stage
        assert set(exported) == set(original)
        assert all(torch.equal(exported[k], original[k]) for k in original)
    hf_config = AutoConfig.from_pretrained(model_dir)
    adapter_config(hf_config, ["all"], R, ALPHA, 0.0).save_pretrained(tmp_path)
    save_file(result["adapter"], str(tmp_path / "adapter_model.safetensors"))
    model = _peft_llama(model_dir, tmp_path).eval()
    ids = _llama_ids(hf_config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    assert _rel(result["logits"], logits) < 1e-5


def test_peft_adapter_with_different_A_for_a_fused_group_is_refused_and_state_dict_round_trips(megatron_tp1, tmp_path):
    from transformers import AutoConfig

    from lf_dist.parallel.megatron import lora, lora_peft
    from lf_dist.parallel.megatron.model_map import build_model_chunks, transformer_config
    from tests.conftest import make_llama

    model_dir = make_llama(tmp_path / "llama", hidden=128, layers=1, intermediate=128)
    hf_config = AutoConfig.from_pretrained(model_dir)
    chunks = build_model_chunks(hf_config, transformer_config(hf_config, tp=1, pp=1))
    lora.apply_lora(chunks, ["q_proj", "k_proj", "v_proj", "down_proj"], R, ALPHA, 0.0, seed=3)
    assert sorted(n for n, p in chunks[0].named_parameters() if p.requires_grad) == [
        "decoder.layers.0.mlp.linear_fc2.lora_A",
        "decoder.layers.0.mlp.linear_fc2.lora_B",
        "decoder.layers.0.self_attention.linear_qkv.lora_A",
        "decoder.layers.0.self_attention.linear_qkv.lora_B",
    ]
    adapter = lora_peft.gather_peft_adapter(chunks, hf_config)
    assert len(adapter) == 2 * 4
    state = {k: v.clone() for k, v in lora.lora_state_dict(chunks).items()}
    adapter["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] += 1.0
    with pytest.raises(UserError, match="q_proj,k_proj,v_proj of layer 0 have different lora_A"):
        lora_peft.load_peft_adapter(chunks, hf_config, adapter)
    with torch.no_grad():
        for _, _, module in lora.lora_modules(chunks):
            module.lora_A.zero_()
    lora.load_lora_state_dict(chunks, state)
    assert all(torch.equal(v, state[k]) for k, v in lora.lora_state_dict(chunks).items())
