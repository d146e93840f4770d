"""Packing: bins fill cutoff_len, and neat packing trains exactly like the unpacked examples."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lf_dist.data import Collator, build_datasets
from lf_dist.data.packing import best_fit_decreasing
from lf_dist.data.templates import fix_tokenizer, get_template
from lf_dist.kernels.attention import register as register_varlen
from lf_dist.train.stages import build_loss
from lf_dist.worker import run

from .conftest import TINY_MODEL, stage_data


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound * 1.02 + 1  # within 2% of the ideal number of rows


def _data(make_cfg, packing: bool, neat: bool, **kw):
    cfg = make_cfg(f"p{packing}{neat}", packing=packing, neat_packing=neat, **kw)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = get_template(cfg.data.template, tok, cfg.data)
    fix_tokenizer(template, tok)
    return cfg, tok, build_datasets(cfg, tok, template, stage_data(cfg)).train


def _loss_and_grads(model, stage, batch):
    model.zero_grad()
    loss, _ = stage(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager", "lf_varlen"])
def test_neat_packed_batch_has_the_loss_and_gradients_of_the_unpacked_examples(make_cfg, attn):
    register_varlen()
    kw = {"max_samples": 24, "cutoff_len": 128, "dataset": "alpaca_demo,sharegpt_demo"}
    cfg_u, tok, unpacked = _data(make_cfg, False, False, **kw)
    cfg_p, _, packed = _data(make_cfg, True, True, **kw)
    assert 1 < len(packed) < len(unpacked)  # several examples per row, several rows per batch
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=attn, dtype=torch.float32)
    collate = Collator(tok.pad_token_id)
    loss_u, grads_u = _loss_and_grads(model, build_loss(cfg_u), collate([unpacked[i] for i in range(len(unpacked))]))
    packed_batch = Collator(tok.pad_token_id, separate=True)([packed[i] for i in range(len(packed))])
    loss_p, grads_p = _loss_and_grads(model, build_loss(cfg_p), packed_batch)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=0)
    for name in grads_u:
        # fp32 sums in another order: elementwise, near-zero entries can differ in their last bits, so the
        # gradient of each tensor is compared as a whole (relative error of the tensor; observed ~3e-7).
        rel = float((grads_p[name] - grads_u[name]).norm() / grads_u[name].norm())
        assert rel < 1e-5, (name, rel)
    # The same rows with cross-attention (plain packing) do see each other: the comparison above is sensitive.
    loss_x, _ = _loss_and_grads(model, build_loss(cfg_u), collate([packed[i] for i in range(len(packed))]))
    assert abs(float(loss_x) - float(loss_u)) > 1e-3


def test_packed_rows_restart_positions_and_keep_labels(make_cfg):
    _, tok, unpacked = _data(make_cfg, False, False, max_samples=30, cutoff_len=256)
    _, _, packed = _data(make_cfg, True, True, max_samples=30, cutoff_len=256)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in unpacked["input_ids"])
    assert max(len(r) for r in packed["input_ids"]) <= 256
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) > 1 and all(row["position_ids"][s - 1] > 0 for s in starts[1:])
    learned = sorted(tuple(x for x in r if x != -100) for r in unpacked["labels"])
    packed_learned = []
    for r in packed:
        bounds = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            packed_learned.append(tuple(x for x in r["labels"][a:b] if x != -100))
    assert sorted(packed_learned) == learned


def test_packing_removes_padding_on_the_demo_data_and_still_learns(make_cfg, tmp_path):
    common = {
        "dataset": "alpaca_demo",
        "cutoff_len": 512,
        "per_device_train_batch_size": 4,
        "max_steps": -1,
        "num_train_epochs": 2,
        "learning_rate": 5e-3,
    }
    plain = run(make_cfg("plain", padding_free=False, **common))  # padded batches, the layout packing replaces
    packed = run(make_cfg("packed", packing=True, neat_packing=True, **common))
    assert plain["padding_ratio"] > 0.05
    assert packed["padding_ratio"] < 0.02, packed
    print(f"padding share: unpacked {plain['padding_ratio']:.4f}, packed {packed['padding_ratio']:.4f}")
    assert packed["num_tokens"] == plain["num_tokens"]  # same tokens seen, fewer slots
    log = [json.loads(x) for x in (tmp_path / "packed" / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] - 0.5, losses  # fewer, fuller steps; it still learns


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2", "lf_varlen"])
def test_neat_packing_on_gpu_matches_unpacked(make_cfg, attn):
    """On CUDA, neat rows go through sdpa's block mask, flash-attention's or torch's varlen kernel."""
    import importlib.util

    register_varlen()
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    kw = {"max_samples": 24, "cutoff_len": 128, "dataset": "alpaca_demo,sharegpt_demo"}
    cfg_u, tok, unpacked = _data(make_cfg, False, False, **kw)
    cfg_p, _, packed = _data(make_cfg, True, True, **kw)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=attn, dtype=torch.bfloat16).cuda()
    collate, separate = Collator(tok.pad_token_id), Collator(tok.pad_token_id, separate=True)
    to_cuda = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    loss_u, _ = _loss_and_grads(
        model, build_loss(cfg_u), to_cuda(collate([unpacked[i] for i in range(len(unpacked))]))
    )
    loss_p, _ = _loss_and_grads(model, build_loss(cfg_p), to_cuda(separate([packed[i] for i in range(len(packed))])))
    torch.testing.assert_close(loss_p.float(), loss_u.float(), rtol=2e-2, atol=0)  # bf16 kernels
