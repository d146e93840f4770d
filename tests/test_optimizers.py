"""LLaMA-Factory's optimizer methods (train/optimizers.py): each one's effect on the optimizer state and the
weights, training through the CLI on the tiny model, on 2 ranks, and across a checkpoint."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from lf_dist.errors import UserError
from lf_dist.train.optim import build_optimizer, build_scheduler
from lf_dist.train.optimizers import LayerwiseOptimizer, MuonWithAdamW
from lf_dist.worker import run

from .conftest import TINY_MODEL, base_overrides
from .test_distributed import _config, lf_dist_train, losses

RANK = 8


@pytest.fixture
def cfg_of(tmp_path):
    from lf_dist.run_checks import load_config

    def make(**extra):
        return load_config(None, base_overrides(tmp_path / "o", **{"finetuning_type": "full", **extra}))

    return make


def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL)


def backward(model) -> None:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()


def train_step(model, optimizer) -> dict[str, torch.Tensor]:
    """One backward and step; the weights before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return before


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_weight_decay_reaches_zero3_placeholders_by_their_real_shape(cfg_of):
    """ZeRO-3 partitions a parameter into an empty 1-D placeholder before the optimizer is built (its shape is
    `ds_shape`): the matrices must still be decayed and the norms not, as on one process."""
    model = tiny_model()
    shapes = {}
    for param in model.parameters():
        shapes[id(param)] = tuple(param.shape)
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    optimizer = build_optimizer(model, cfg_of(weight_decay=0.5))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    assert decayed and all(len(shapes[i]) == 2 for i in decayed)
    assert {i for i, s in shapes.items() if len(s) == 2} == decayed


# -- GaLore / APOLLO ----------------------------------------------------------------------------------------
def test_galore_projects_linear_weights_to_its_rank_and_checkpoints_load_weights_only(cfg_of):
    model = tiny_model()
    optimizer = build_optimizer(model, cfg_of(use_galore=True, galore_rank=RANK, weight_decay=0.01))
    train_step(model, optimizer)
    params = dict(model.named_parameters())
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"):
        param = params[f"model.layers.0.{name}.weight"]
        state = optimizer.state[param]
        assert RANK in state["projector"].ortho_matrix.shape, name
        assert RANK in state["exp_avg"].shape and state["exp_avg"].numel() < param.numel() / 4, name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # plain Adam moments
        assert "projector" not in optimizer.state[params[name]]
        assert optimizer.state[params[name]]["exp_avg"].shape == params[name].shape
    by_name = {id(p): n for n, p in model.named_parameters()}
    plain = [{by_name[id(p)] for p in g["params"]} for g in optimizer.param_groups if "rank" not in g]
    # LF's decay rule: an RMSNorm's weight is decayed like the embeddings and the output layer (no target)
    assert plain == [
        {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"}
        | {n for n in by_name.values() if "layernorm" in n}
    ]
    # the state saves as tensors and numbers, loads with weights_only, and steps on exactly as the original
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg_of(use_galore=True, galore_rank=RANK, weight_decay=0.01))
    twin_opt.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    train_step(model, optimizer), train_step(twin, twin_opt)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_galore_layerwise_steps_every_weight_in_its_backward_hook(cfg_of):
    model = tiny_model()
    cfg = cfg_of(use_galore=True, galore_rank=RANK, galore_layerwise=True, lr_scheduler_type="linear")
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, LayerwiseOptimizer)
    build_scheduler(optimizer, cfg, total_steps=4)
    inner = optimizer.per_param
    assert set(inner) == set(model.parameters()) and len({id(o) for o in inner.values()}) == len(inner)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model)  # no optimizer.step(): the hooks stepped every weight
    assert changed(model, before) == set(before)
    assert all(p.grad is None for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj.weight
    assert RANK in inner[q].state[q]["projector"].ortho_matrix.shape
    # each parameter's own schedule moved once: linear decay over 4 steps from 1e-3
    assert [o.param_groups[0]["lr"] for o in inner.values()] == pytest.approx([1e-3 * 3 / 4] * len(inner))


def test_apollo_keeps_projected_moments(cfg_of):
    model = tiny_model()
    optimizer = build_optimizer(model, cfg_of(use_apollo=True, apollo_rank=RANK))
    train_step(model, optimizer)
    for module in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.up_proj):
        state = optimizer.state[module.weight]
        assert RANK in state["exp_avg"].shape and state["exp_avg"].shape != module.weight.shape
    assert optimizer.state[model.lm_head.weight]["exp_avg"].shape == model.lm_head.weight.shape


# -- BAdam ---------------------------------------------------------------------------------------------------
def test_badam_layer_trains_one_block_at_a_time_in_ascending_order(cfg_of):
    model = tiny_model()
    optimizer = build_optimizer(model, cfg_of(use_badam=True, badam_switch_interval=2))
    blocks = []
    for _ in range(6):
        before = train_step(model, optimizer)
        moved = changed(model, before)
        assert moved and all(".layers." in n for n in moved)  # embeddings, head and final norm stay
        (block,) = {n.split(".")[2] for n in moved}
        assert moved == {n for n in before if f"layers.{block}." in n}
        blocks.append(int(block))
    # BAdam counts the first block's switch from step 0: it holds 1 step, then each block holds 2
    assert blocks == [0, 1, 1, 0, 0, 1]


def test_badam_ratio_updates_a_fraction_of_each_weight(cfg_of):
    model = tiny_model()
    optimizer = build_optimizer(model, cfg_of(use_badam=True, badam_mode="ratio", badam_update_ratio=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # the strategy's clipping reads the masked gradients
    assert math.isfinite(float(norm))
    optimizer.step()
    for name, param in model.named_parameters():
        share = float((param != before[name]).float().mean())
        if "embed" in name or "lm_head" in name:
            assert share == 0.0, name
        elif param.ndim == 2:
            assert 0.05 < share <= 0.1, (name, share)


# -- Adam-mini / Muon / LoRA+ --------------------------------------------------------------------------------
def test_adam_mini_keeps_one_second_moment_per_block(cfg_of):
    model = tiny_model()
    optimizer = build_optimizer(model, cfg_of(use_adam_mini=True))
    train_step(model, optimizer)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    heads = model.config.num_attention_heads
    assert optimizer.state[attn.q_proj.weight]["vmean"].numel() == heads  # one per head
    assert optimizer.state[attn.k_proj.weight]["vmean"].numel() == model.config.num_key_value_heads
    assert optimizer.state[mlp.gate_proj.weight]["vmean"].numel() == mlp.gate_proj.weight.shape[0]  # per neuron
    assert optimizer.state[model.model.norm.weight]["vmean"].numel() == 1
    for param in (attn.q_proj.weight, mlp.down_proj.weight):
        assert optimizer.state[param]["vmean"].numel() * 50 < param.numel()


def test_muon_update_is_torch_muon_at_moonlights_learning_rate(cfg_of):
    from torch.optim._muon import _adjust_lr

    for a, b in ((96, 96), (256, 96), (96, 256)):  # torch's match_rms_adamw is Moonlight's 0.2·sqrt(max(A, B))
        assert _adjust_lr(1e-3, "match_rms_adamw", torch.Size((a, b))) == pytest.approx(
            1e-3 * 0.2 * math.sqrt(max(a, b))
        )
    model = tiny_model()
    optimizer = build_optimizer(model, cfg_of(use_muon=True))
    assert isinstance(optimizer, MuonWithAdamW)
    weight = model.model.layers[0].mlp.gate_proj.weight
    reference = torch.nn.Parameter(weight.detach().clone())
    ref_opt = torch.optim.Muon([reference], lr=1e-3 * 0.2 * math.sqrt(max(weight.shape)), weight_decay=0.0)
    ref_opt.param_groups[0]["adjust_lr_fn"] = "none"  # torch's unscaled path: the lr above is the whole step
    backward(model)
    reference.grad = weight.grad.clone()
    optimizer.step(), ref_opt.step()
    torch.testing.assert_close(weight.detach(), reference.detach(), rtol=0, atol=1e-7)
    assert not torch.equal(weight, reference.grad)
    for param in (model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight):
        assert set(optimizer.state[param]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's
    assert set(optimizer.state[model.model.layers[1].self_attn.o_proj.weight]) == {"momentum_buffer"}
    restored = build_optimizer(tiny_model(), cfg_of(use_muon=True))
    restored.load_state_dict(optimizer.state_dict())
    assert len(restored.state) == len(optimizer.state) and restored.parts[0].state is restored.state


def test_loraplus_puts_b_matrices_at_ratio_times_the_learning_rate(cfg_of):
    from lf_dist.model.adapter import apply_finetuning

    cfg = cfg_of(finetuning_type="lora", lora_target="all", loraplus_lr_ratio=16.0, learning_rate=2e-4)
    model = apply_finetuning(tiny_model(), cfg)
    optimizer = build_optimizer(model, cfg)
    by_id = {id(p): n for n, p in model.named_parameters()}
    lrs = {by_id[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs and all(lr == pytest.approx(2e-4) for n, lr in lrs.items() if "lora_A" in n)
    assert all(lr == pytest.approx(16 * 2e-4) for n, lr in lrs.items() if "lora_B" in n)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lrs)


# -- through the CLI -------------------------------------------------------------------------------------------
METHODS = {
    "galore": {"use_galore": True, "galore_rank": RANK, "galore_update_interval": 5},
    "galore_layerwise": {"use_galore": True, "galore_rank": RANK, "galore_layerwise": True},
    "apollo": {"use_apollo": True, "apollo_rank": RANK},
    "apollo_layerwise": {"use_apollo": True, "apollo_rank": RANK, "apollo_layerwise": True},
    "badam_layer": {"use_badam": True, "badam_switch_interval": 3},
    "badam_ratio": {"use_badam": True, "badam_mode": "ratio", "badam_update_ratio": 0.2},
    "adam_mini": {"use_adam_mini": True},
    "muon": {"use_muon": True},
    "loraplus": {"finetuning_type": "lora", "loraplus_lr_ratio": 4.0, "learning_rate": 2e-3},
}


def log_losses(out: Path) -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_the_tiny_model(make_cfg, method):
    cfg = make_cfg(method, **{"finetuning_type": "full", "max_steps": 12, **METHODS[method]})
    run(cfg)
    got = log_losses(Path(cfg.train.output_dir))
    assert len(got) == 12 and sum(got[-4:]) / 4 < got[0] - 4, got


def test_muon_resume_continues_the_uninterrupted_losses(make_cfg, monkeypatch):
    extra = {"finetuning_type": "full", "use_muon": True, "max_steps": 6, "save_steps": 3, "warmup_steps": 1}
    ref = make_cfg("ref", **extra)
    run(ref)
    cfg = make_cfg("crash", **extra)
    monkeypatch.setenv("LF_DIST_FAIL_AT_STEP", "4")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.delenv("LF_DIST_FAIL_AT_STEP")
    run(make_cfg("crash", resume_from_checkpoint=True, **extra))
    assert log_losses(Path(cfg.train.output_dir)) == log_losses(Path(ref.train.output_dir))


def test_layerwise_resume_is_refused_in_one_line(make_cfg):
    extra = {"finetuning_type": "full", **METHODS["galore_layerwise"], "max_steps": 4, "save_steps": 2}
    run(make_cfg("lw", **extra))
    with pytest.raises(UserError) as err:
        run(make_cfg("lw", resume_from_checkpoint=True, **extra))
    assert "galore_layerwise" in str(err.value) and "\n" not in str(err.value)


# -- 2 ranks (gloo) ---------------------------------------------------------------------------------------------
DDP_METHODS = {
    "galore": ("full", ["use_galore=true", f"galore_rank={RANK}"]),
    "apollo": ("full", ["use_apollo=true", f"apollo_rank={RANK}"]),
    "muon": ("full", ["use_muon=true"]),
    "adam_mini": ("full", ["use_adam_mini=true"]),
    "loraplus": ("lora", ["loraplus_lr_ratio=4"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DDP_METHODS))
def test_ddp_two_ranks_match_one_process(tmp_path, method):
    kind, keys = DDP_METHODS[method]
    config = _config(tmp_path, kind)
    keys = [*keys, "max_samples=16", "max_steps=12"]  # 3 epochs of 4 steps over the same 16 examples
    lf_dist_train(config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4", *keys, nproc=None)
    lf_dist_train(config, f"output_dir={tmp_path / 'two'}", "strategy=ddp", *keys)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sum(one[-4:]) < sum(one[:4]) - 4, one  # the third epoch's loss is well below the first's
    # the same global batch gives the same averaged gradient; Muon and GaLore orthogonalise / project it, which
    # amplifies the summation-order rounding of the all-reduce a little
    assert two == pytest.approx(one, abs=1e-3 if method in ("galore", "apollo", "muon") else 1e-4), (one, two)


REFUSED = {
    "galore_layerwise_two_ranks": ["strategy=ddp", "use_galore=true", "galore_layerwise=true"],
    "galore_deepspeed": [
        f"deepspeed={Path(__file__).parents[1] / 'examples/deepspeed/ds_z2_config.json'}",
        "use_galore=true",
    ],
    "muon_fsdp2": ["strategy=fsdp2", "use_muon=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_pairs_exit_2_in_one_line(tmp_path, name):
    proc = lf_dist_train(_config(tmp_path, "full"), f"output_dir={tmp_path / 'o'}", *REFUSED[name], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lf-dist: error: ")
