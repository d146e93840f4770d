"""The speed paths keep the numbers: padding-free batches, varlen attention, mask-free causal rows and the
chunked linear cross-entropy each equal the plain path they replace (fp32), and the plan names them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lf_dist.data import build_datasets
from lf_dist.data.collator import Collator, FeedbackCollator, PairwiseCollator
from lf_dist.data.templates import fix_tokenizer, get_template
from lf_dist.kernels import cross_entropy as ce
from lf_dist.kernels.attention import register as register_varlen
from lf_dist.kernels.attention import varlen_attention
from lf_dist.train.losses import Frozen, model_inputs
from lf_dist.train.preference import DPOLoss, KTOLoss, RewardLoss
from lf_dist.train.stages import build_loss
from lf_dist.train.token_logps import label_logps

from .conftest import TINY_MODEL, stage_data


class _Ops(TorchDispatchMode):
    """Records (op name, output shapes) of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((func.__name__, [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# -- chunked linear cross-entropy ------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_linear_cross_entropy_equals_the_naive_path_without_vocabulary_wide_logits(monkeypatch, bias):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 4096)  # 16 tokens per chunk at this vocabulary: many chunks
    monkeypatch.setattr(ce, "MIN_CHUNK_TOKENS", 1)
    torch.manual_seed(0)
    n, hidden, vocab = 100, 32, 256
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True) if bias else None
    y, g = torch.randint(0, vocab, (n,)), torch.randn(n)  # g: a per-token weight, as DPO's gradient is
    with _Ops() as seen:
        ours = ce.linear_logps(h, w, b, y)
        grads = torch.autograd.grad((ours * g).sum(), [t for t in (h, w, b) if t is not None])
    naive = -F.cross_entropy(F.linear(h, w, b), y, reduction="none")
    expected = torch.autograd.grad((naive * g).sum(), [t for t in (h, w, b) if t is not None])
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected):
        assert _rel(got, want) < 1e-5
    rows = [s[0] for _, shapes in seen.ops for s in shapes if len(s) == 2 and s[1] == vocab and s != (hidden, vocab)]
    assert rows and max(rows) <= ce.chunk_size(vocab) < n  # never more than one chunk of logits


class _Storages(TorchDispatchMode):
    """The storages of every [*, vocab] tensor made inside it."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.storages = vocab, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == self.vocab:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_cross_entropy_writes_every_chunk_into_one_logits_buffer(monkeypatch, weight_trains):
    """Fresh [chunk × vocab] tensors per chunk cost page faults (a fifth of the output layer's time on the build
    CPU): the forward, and the backward of a trained weight, reuse one buffer for all chunks."""
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(ce, "MIN_CHUNK_TOKENS", 1)
    torch.manual_seed(0)
    h = torch.randn(100, 32, requires_grad=True)
    w = torch.randn(256, 32, requires_grad=weight_trains)
    y = torch.randint(0, 256, (100,))
    with _Storages(256) as forward:
        logps = ce.linear_logps(h, w, None, y)
    with _Storages(256) as backward:
        logps.sum().backward()
    made = [seen.storages - {w.untyped_storage().data_ptr()} for seen in (forward, backward)]  # not w.t()
    assert len(made[0]) == 1  # 7 chunks of 16 tokens, one buffer
    assert len(made[1]) == (1 if weight_trains else 0)


def test_chunked_cross_entropy_in_bf16_follows_the_plain_bf16_path():
    """bf16 weights: the matmuls run in bf16 as F.linear does, softmax and log-probs in fp32."""
    torch.manual_seed(0)
    h = torch.randn(300, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 64, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 512, (300,))
    ours = ce.linear_logps(h, w, None, y)
    grads = torch.autograd.grad(ours.sum(), [h, w])
    naive = -F.cross_entropy(F.linear(h, w).float(), y, reduction="none")
    expected = torch.autograd.grad(naive.sum(), [h, w])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected):
        assert got.dtype == torch.bfloat16 and _rel(got.float(), want.float()) < 2e-2


def test_a_frozen_output_layer_costs_no_matmul_in_the_backward():
    """Under LoRA the output layer is frozen: d logp / d hidden is kept from the forward, nothing is recomputed."""
    torch.manual_seed(0)
    h, w = torch.randn(64, 32, requires_grad=True), torch.randn(512, 32)
    logps = ce.linear_logps(h, w, None, torch.randint(0, 512, (64,)))
    with _Ops() as seen:
        logps.sum().backward()
    assert not [op for op, _ in seen.ops if op.startswith(("mm", "addmm", "bmm", "matmul"))], seen.ops


# -- batch layouts ---------------------------------------------------------------------------------------------
def _rows(make_cfg, stage: str, dataset: str, n: int, tok):
    cfg = make_cfg(stage=stage, dataset=dataset, max_samples=n, cutoff_len=256)
    template = get_template("chatml", tok, cfg.data)
    fix_tokenizer(template, tok)
    train = build_datasets(cfg, tok, template, stage_data(cfg)).train
    return cfg, [train[i] for i in range(len(train))]


def _loss_and_grads(model, loss, batch):
    model.zero_grad()
    value, metrics = loss(model, batch)
    value.backward()
    return value.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for key in metrics_b:
        torch.testing.assert_close(metrics_a[key], metrics_b[key], rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        assert _rel(grads_a[name], grads_b[name]) < 1e-5, name


@pytest.mark.parametrize("attn", ["sdpa", "lf_varlen"])
def test_padding_free_sft_batch_has_the_loss_and_gradients_of_the_padded_batch(make_cfg, attn):
    register_varlen()
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    cfg, rows = _rows(make_cfg, "sft", "alpaca_demo,sharegpt_demo", 12, tok)
    padded, free = Collator(tok.pad_token_id)(rows), Collator(tok.pad_token_id, padding_free=True)(rows)
    assert free["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # no padding at all
    assert padded["input_ids"].numel() > 1.3 * free["input_ids"].numel()
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=attn, dtype=torch.float32)
    loss = build_loss(cfg)
    assert loss.num_units(free) == loss.num_units(padded)
    _assert_same(_loss_and_grads(model, loss, free), _loss_and_grads(model, loss, padded))


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_padding_free_preference_batches_give_the_padded_losses_and_metrics(make_cfg, stage):
    register_varlen()
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    dataset = "kto_demo" if stage == "kto" else "ranking_demo"
    _, rows = _rows(make_cfg, stage, dataset, 8, tok)
    if stage == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(
            TINY_MODEL, num_labels=1, attn_implementation="lf_varlen", dtype=torch.float32
        )
        model.config.pad_token_id = tok.pad_token_id
        loss = RewardLoss()
    else:
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation="lf_varlen", dtype=torch.float32)
        ref = Frozen(copy.deepcopy(model).eval().requires_grad_(False))
        with torch.no_grad():  # a policy apart from its reference, so rewards are not zero
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
        loss = KTOLoss(0.1, 0.0, 1.0, 1.0, ref) if stage == "kto" else DPOLoss("sigmoid", 0.1, 0.0, 0.0, 0.5, ref)
    if stage == "kto":
        make = lambda free: FeedbackCollator(tok.pad_token_id, 256, padding_free=free)  # noqa: E731
    else:
        make = lambda free: PairwiseCollator(tok.pad_token_id, padding_free=free)  # noqa: E731
    padded, free = make(False)(rows), make(True)(rows)
    assert free["input_ids"].shape[0] == 1 and "attention_mask" not in free
    assert loss.num_units(free) == loss.num_units(padded)
    _assert_same(_loss_and_grads(model, loss, free), _loss_and_grads(model, loss, padded))


class _WithPaddingMask:
    """The causal-LM loss with the 2-D padding mask fed, as before."""

    def __call__(self, model, batch):
        inputs = {**model_inputs(batch), "attention_mask": batch["attention_mask"]}
        return -label_logps(model, inputs, batch["labels"])[0].sum(), {}


def _spy_sdpa(monkeypatch) -> list:
    calls, real = [], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return real(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("packing", [False, True], ids=["right-padded", "plain-packing"])
def test_causal_rows_attend_without_a_4d_mask_and_keep_their_loss(make_cfg, monkeypatch, packing):
    """Right-padded rows, and LLaMA-Factory's plain packing (examples of a row see each other), need no mask:
    sdpa runs is_causal, and loss and gradients equal those with the padding mask."""
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    cfg = make_cfg(packing=packing, neat_packing=False, max_samples=24, dataset="alpaca_demo,sharegpt_demo")
    template = get_template("chatml", tok, cfg.data)
    fix_tokenizer(template, tok)
    train = build_datasets(cfg, tok, template, stage_data(cfg)).train
    batch = Collator(tok.pad_token_id)([train[i] for i in range(min(6, len(train)))])
    assert bool((batch["attention_mask"] == 0).any())  # there is padding to not mask
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation="sdpa", dtype=torch.float32)
    loss = build_loss(cfg)
    calls = _spy_sdpa(monkeypatch)
    fast = _loss_and_grads(model, loss, batch)
    assert calls and all(no_mask and causal for no_mask, causal in calls), calls
    _assert_same(fast, _loss_and_grads(model, _WithPaddingMask(), batch))


def test_varlen_attention_keeps_segments_apart_within_a_sliding_window():
    torch.manual_seed(0)
    lens, heads, kv, dim, window = [9, 4, 15], 4, 2, 8, 5
    t = sum(lens)
    q, k, v = torch.randn(1, heads, t, dim), torch.randn(1, kv, t, dim), torch.randn(1, kv, t, dim)
    cu = torch.tensor([0, 9, 13, 28], dtype=torch.int32)
    module = torch.nn.Module()
    out, _ = varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=15, sliding_window=window)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    i = torch.arange(t)
    allowed = (seg[:, None] == seg[None, :]) & (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


# -- the plan names each choice --------------------------------------------------------------------------------
def _plan(profile: str = "cpu", model=TINY_MODEL, stage: str = "sft", **keys):
    from lf_dist.planner import load_profile, make_plan
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    values = {"model_name_or_path": model, "stage": stage, "dataset": "alpaca_demo", "output_dir": "o", **keys}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    return make_plan(cfg, load_profile(profile), get_stage(stage), launching=False)


def _said(plan, start: str) -> str:
    return next(r for r in plan.reasons if r.startswith(start))


def test_the_plan_picks_varlen_padding_free_chunked_ce_and_fused_adamw_on_cpu_and_says_why():
    plan = _plan()
    assert (plan.attention, plan.padding_free, plan.cross_entropy, plan.liger) == ("varlen", True, "chunked", False)
    assert plan.optim == "adamw_torch_fused"
    assert "one causal sdpa call per example" in _said(plan, "attention varlen")
    assert "no padding" in _said(plan, "padding-free batches")
    assert "no [tokens × vocabulary] logits" in _said(plan, "cross-entropy chunked")
    assert not [r for r in plan.reasons if r.startswith("liger")]  # not asked for, no CUDA: nothing to say
    assert _plan(optim="adamw_torch").optim == "adamw_torch"  # a key the user set is kept
    assert "padding-free batches" in plan.summary() and "chunked cross-entropy" in plan.summary()


@pytest.mark.parametrize(
    ("keys", "attention", "padding_free", "says"),
    [
        ({"padding_free": False}, "varlen", False, "padding-free batches off: as the config says"),
        ({"packing": True}, "varlen", False, "padding-free batches off: rows are packed already"),
        ({"flash_attn": "sdpa"}, "sdpa", False, "attention sdpa would need a block mask"),
        ({"flash_attn": "sdpa", "padding_free": True}, "sdpa", True, "padding-free batches on: as the config says"),
    ],
)
def test_a_key_the_user_set_is_kept_and_the_plan_says_so(keys, attention, padding_free, says):
    plan = _plan(**keys)
    assert (plan.attention, plan.padding_free) == (attention, padding_free)
    assert any(says in r for r in plan.reasons), plan.reasons


def test_liger_is_a_named_fallback_without_cuda_and_the_default_with_it():
    cpu = _plan(enable_liger_kernel=True)
    assert not cpu.liger and cpu.cross_entropy == "chunked"
    assert "liger off: no CUDA" in _said(cpu, "liger off")
    gpu = _plan("h100x8", model=TINY_MODEL)
    assert gpu.liger and gpu.cross_entropy == "liger"  # liger-kernel is in the dev extra
    assert "(the default on CUDA)" in _said(gpu, "liger on")
    assert not _plan("h100x8", enable_liger_kernel=False).liger
    assert _plan(stage="rm", dataset="ranking_demo").cross_entropy == "none"  # a score head has no vocabulary


LIGER_PROBE = f"""
import torch
from transformers import AutoModelForCausalLM
from lf_dist.kernels import liger

model = AutoModelForCausalLM.from_pretrained({str(TINY_MODEL)!r}, dtype=torch.float32)
forward = model.forward
liger.apply(model)
norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
assert norms and all("liger" in m.forward.__module__ for m in norms), [m.forward.__module__ for m in norms]
assert "liger" in model.model.layers[0].mlp.forward.__module__
assert model.forward == forward  # Liger's loss-computing forward is not installed: the log-probs are ours
assert model.get_output_embeddings().lf_dist_liger
print("patched")
"""


def test_liger_patches_a_loaded_model_in_place_without_touching_its_loss():
    """In its own process: Liger's RoPE patch replaces a module-level function of transformers for good."""
    import subprocess
    import sys

    pytest.importorskip("liger_kernel")
    out = subprocess.run([sys.executable, "-c", LIGER_PROBE], capture_output=True, text=True, encoding="utf-8")
    assert out.returncode == 0 and "patched" in out.stdout, out.stderr[-2000:]


def test_train_runs_the_planned_kernels(make_cfg, monkeypatch):
    """The run uses what the plan chose: varlen attention, padding-free collation, fused AdamW."""
    from lf_dist.kernels import attention
    from lf_dist.worker import run

    optimizers, segments = [], []
    real_adamw, real_segment = torch.optim.AdamW, attention._segment

    def adamw(*args, **kwargs):
        optimizers.append(kwargs)
        return real_adamw(*args, **kwargs)

    def segment(*args):
        segments.append(args[0].shape[2])
        return real_segment(*args)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(attention, "_segment", segment)
    cfg = make_cfg(max_steps=2)
    results = run(cfg)
    assert results["padding_ratio"] == 0.0  # padding-free batches
    plan = json.loads((Path(cfg.train.output_dir) / "run_plan.json").read_text(encoding="utf-8"))
    assert (plan["attention"], plan["padding_free"], plan["optim"]) == ("varlen", True, "adamw_torch_fused")
    assert optimizers and optimizers[0].get("fused") is True
    assert len(segments) >= 2 * 4 * 2  # layers × examples per micro-batch × steps: one sdpa call per example


# -- CUDA: Liger and torch's varlen kernel (skip without a GPU) -------------------------------------------------
def _tiny(family: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        family,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()


def _cuda_batch(vocab: int, lens=(40, 17, 64)):
    torch.manual_seed(1)
    rows = [{"input_ids": torch.randint(3, vocab, (n,)).tolist()} for n in lens]
    for r in rows:
        r["labels"] = [-100] * 5 + r["input_ids"][5:]
    batch = Collator(0, padding_free=True)(rows)
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_liger_patch_keeps_the_loss_and_gradients_of_the_unpatched_model(family):
    from lf_dist.kernels import liger
    from lf_dist.train.losses import CausalLMLoss

    pytest.importorskip("liger_kernel")
    model = _tiny(family)
    batch = _cuda_batch(model.config.vocab_size)
    before = _loss_and_grads(model, CausalLMLoss(), batch)  # before patching: Liger's RoPE patch is global
    liger.apply(model)
    after = _loss_and_grads(model, CausalLMLoss(), batch)
    torch.testing.assert_close(after[0].float(), before[0].float(), rtol=2e-2, atol=0)
    for name, grad in before[2].items():
        assert _rel(after[2][name].float(), grad.float()) < 5e-2, name  # bf16 kernels


@pytest.mark.cuda
def test_liger_with_lora_gives_the_dpo_loss_of_the_unpatched_model():
    from peft import LoraConfig, get_peft_model

    from lf_dist.kernels import liger

    pytest.importorskip("liger_kernel")
    base = _tiny("llama")
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    rows = [
        {"chosen_input_ids": list(range(3, 40)), "chosen_labels": [-100] * 5 + list(range(8, 40))},
        {"chosen_input_ids": list(range(5, 30)), "chosen_labels": [-100] * 4 + list(range(9, 30))},
    ]
    for r in rows:
        r["rejected_input_ids"], r["rejected_labels"] = r["chosen_input_ids"][::-1], r["chosen_labels"][::-1]
    batch = {k: v.cuda() for k, v in PairwiseCollator(0, padding_free=True)(rows).items()}
    loss = DPOLoss("sigmoid", 0.1, 0.0, 0.0, 0.5, Frozen(None, lambda m: m))
    before = _loss_and_grads(model, loss, batch)
    liger.apply(base)
    after = _loss_and_grads(model, loss, batch)
    torch.testing.assert_close(after[0].float(), before[0].float(), rtol=2e-2, atol=1e-3)
    for name, grad in before[2].items():
        assert _rel(after[2][name].float(), grad.float()) < 5e-2, name


@pytest.mark.cuda
def test_torch_varlen_kernel_matches_one_sdpa_call_per_segment():
    from lf_dist.kernels import attention

    if not attention._has_varlen():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    q = torch.randn(1, 8, 121, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 2, 121, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    cu = torch.tensor([0, 50, 51, 121], dtype=torch.int32, device="cuda")
    module = torch.nn.Module()
    fast, _ = varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=70)
    parts = [
        attention._segment(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, None, 0.0, True)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
    ]
    torch.testing.assert_close(fast, torch.cat(parts, 2).transpose(1, 2), atol=2e-2, rtol=2e-2)
