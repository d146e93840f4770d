"""Preference stages on one process: they learn a separable preference, log TRL's metrics, pack pairs without
changing the loss, use the right reference model, and save a reward model that scores text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lf_dist.worker import run

from .conftest import TINY_MODEL, stage_data

WORDS = "dragon basket tiger silver bridge pencil harbor yellow river umbrella garden window candle forest".split()
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
LOGGED = PAIR_METRICS + ("logps/chosen", "logps/rejected")


def _prompt(word: str) -> str:
    return f"Write the word in capital letters.\n{word}"


def write_separable(root: Path, n_train: int = 160, n_eval: int = 40, seed: int = 0) -> Path:
    """Pairs whose chosen answer is the word in capitals and the rejected one a lower-case copy: one feature
    separates them. The same data as kto records (each answer once, tagged). Eval words never train."""
    rng = random.Random(seed)
    words = [w + s for w in WORDS for s in ("", "s", "ing", "er", "ed", "ly")]
    rng.shuffle(words)
    eval_words, train_words = words[:n_eval], words[n_eval:]

    def pairs(pool, n):
        picks = [pool[i % len(pool)] for i in range(n)]
        return [
            {
                "conversations": [{"from": "human", "value": _prompt(w)}],
                "chosen": {"from": "gpt", "value": w.upper()},
                "rejected": {"from": "gpt", "value": w},
            }
            for w in picks
        ]

    def kto(pool, n):
        picks = [pool[i % len(pool)] for i in range(n)]
        return [
            {
                "messages": [
                    {"role": "user", "content": _prompt(w)},
                    {"role": "assistant", "content": w.upper() if i % 2 else w},
                ],
                "label": bool(i % 2),
            }
            for i, w in enumerate(picks)
        ]

    root.mkdir(parents=True, exist_ok=True)
    files = {
        "sep_pairs": pairs(train_words, n_train),
        "sep_pairs_eval": pairs(eval_words, n_eval),
        "sep_kto": kto(train_words, n_train),
        "sep_kto_eval": kto(eval_words, n_eval),
    }
    info = {}
    for name, rows in files.items():
        (root / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
        if "kto" in name:
            columns = {"messages": "messages", "kto_tag": "label"}
            tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
            info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt", "columns": columns, "tags": tags}
        else:
            columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
            info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": True, "columns": columns}
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    return write_separable(tmp_path_factory.mktemp("separable"))


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


def pref_cfg(make_cfg, separable, stage: str, name: str = "run", **extra):
    kto = stage == "kto"
    values = {
        "stage": stage,
        "dataset": "sep_kto" if kto else "sep_pairs",
        "eval_dataset": "sep_kto_eval" if kto else "sep_pairs_eval",
        "dataset_dir": str(separable),
        "max_steps": 30,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 20,
        "learning_rate": 5e-3,
        "logging_first_step": True,
        "logging_steps": 5,
        "lora_rank": 8,
    }
    values.update(extra)
    return make_cfg(name, **values)


LEARNING = [
    ("dpo", {"pref_loss": "sigmoid", "pref_beta": 0.1}),
    ("dpo", {"pref_loss": "orpo", "pref_beta": 0.1}),
    ("dpo", {"pref_loss": "simpo", "pref_beta": 2.0, "simpo_gamma": 0.5}),
    ("kto", {"pref_beta": 0.1}),
]


@pytest.mark.parametrize("stage,extra", LEARNING, ids=["dpo", "orpo", "simpo", "kto"])
def test_preference_stage_learns_separable_preference(make_cfg, separable, stage, extra):
    cfg = pref_cfg(make_cfg, separable, stage, **extra)
    results = run(cfg)
    log = _log(cfg.train.output_dir)
    train = [e for e in log if "loss" in e]
    assert [e["current_steps"] for e in train] == [1, 5, 10, 15, 20, 25, 30]
    for entry in train:  # what LLaMA-Factory's DPO runs log, every logged step
        assert set(LOGGED) <= set(entry), entry
    assert results["eval_rewards/accuracies"] > 0.8, results
    assert results["eval_rewards/margins"] > train[0]["rewards/margins"] + 0.05, (train[0], results)
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]


def _score_texts(out: Path, prompts_answers: list[tuple[str, str]]) -> torch.Tensor:
    """Scores from the saved reward model, loaded the standard way (sequence classification + peft adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(
        TINY_MODEL, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(base, out).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=False
        )
        for p, a in prompts_answers
    ]
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return model(**batch).logits.squeeze(-1)


def test_reward_model_learns_pairs_and_saved_model_scores_text(make_cfg, separable):
    cfg = pref_cfg(make_cfg, separable, "rm")
    results = run(cfg)
    train = [e for e in _log(cfg.train.output_dir) if "loss" in e]
    for entry in train:
        assert set(PAIR_METRICS) <= set(entry), entry
    assert results["eval_rewards/accuracies"] > 0.8, results
    assert results["eval_rewards/margins"] > train[0]["rewards/margins"]
    # the saved output scores unseen text: the capitalized answer above the lower-case one
    pairs = json.loads((separable / "sep_pairs_eval.json").read_text(encoding="utf-8"))
    chosen = _score_texts(
        cfg.train.output_dir, [(p["conversations"][0]["value"], p["chosen"]["value"]) for p in pairs]
    )
    rejected = _score_texts(
        cfg.train.output_dir, [(p["conversations"][0]["value"], p["rejected"]["value"]) for p in pairs]
    )
    assert float((chosen > rejected).float().mean()) > 0.8


def _dataset(make_cfg, stage: str, name: str, **extra):
    from transformers import AutoTokenizer

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import get_template

    cfg = make_cfg(name, stage=stage, dataset="ranking_demo", max_samples=24, cutoff_len=64, **extra)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    train = build_datasets(cfg, tokenizer, get_template("chatml", tokenizer, cfg.data), stage_data(cfg)).train
    return [train[i] for i in range(len(train))], tokenizer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_packed_pairs_give_the_unpacked_loss_and_metrics(make_cfg, stage, device):
    """Pairs packed into shared rows (no attention mask: a block-diagonal mask from the restarting positions)
    give the loss, rewards and log-probs of the padded batch, and their gradients."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lf_dist.data.collator import PairwiseCollator
    from lf_dist.train.losses import Frozen
    from lf_dist.train.preference import DPOLoss, RewardLoss

    unpacked, tokenizer = _dataset(make_cfg, stage, "unpacked")
    packed, _ = _dataset(make_cfg, stage, "packed", packing=True)
    assert len(packed) < len(unpacked) and sum(len(r["seq_lens"]) for r in packed) == 2 * len(unpacked)
    collate = PairwiseCollator(tokenizer.pad_token_id)
    batch_u, batch_p = ({k: v.to(device) for k, v in collate(rows).items()} for rows in (unpacked, packed))
    assert "attention_mask" not in batch_p
    torch.manual_seed(0)
    if stage == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(
            TINY_MODEL, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
        loss_fn = RewardLoss()
    else:
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
        ref = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        loss_fn = DPOLoss("sigmoid", 0.1, 0.0, 0.0, 0.5, Frozen(ref.to(device)))
    model.to(device).train()
    tol = 1e-5 if device == "cpu" else 1e-4  # GPU kernels for masked and block-diagonal attention differ more

    def loss_and_grads(batch):
        model.zero_grad()
        loss, metrics = loss_fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach().item(), {k: (v[0] / v[1]).item() for k, v in metrics.items()}, grads

    loss_u, metrics_u, grads_u = loss_and_grads(batch_u)
    loss_p, metrics_p, grads_p = loss_and_grads(batch_p)
    assert loss_p == pytest.approx(loss_u, rel=tol)
    for key, value in metrics_u.items():
        assert metrics_p[key] == pytest.approx(value, rel=tol, abs=tol), key
    for name, grad in grads_u.items():
        assert float((grads_p[name] - grad).abs().max() / grad.abs().max()) < tol, name  # fp32 round-off


def test_lora_reference_is_the_policy_with_adapters_disabled(make_cfg):
    """No second model: the reference log-probs are the base model's, however far the adapters have moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lf_dist.data.collator import PairwiseCollator
    from lf_dist.model import apply_finetuning, load_model
    from lf_dist.parallel import SingleStrategy
    from lf_dist.train.losses import model_inputs
    from lf_dist.train.stages import get_stage
    from lf_dist.train.token_logps import sequence_logps
    from lf_dist.worker import build_frozen

    cfg = make_cfg(stage="dpo", dataset="ranking_demo", max_samples=8)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    reference = build_frozen(cfg, get_stage("dpo"), SingleStrategy(cfg), tokenizer)["reference"]
    assert reference.model is None
    policy = apply_finetuning(load_model(cfg, tokenizer), cfg)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    rows, _ = _dataset(make_cfg, "dpo", "rows")
    batch = PairwiseCollator(tokenizer.pad_token_id)(rows)
    n = batch["ends"].numel()
    ref_logps = reference.logps(policy, model_inputs(batch), batch["labels"], batch["seq_ids"], n)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    with torch.no_grad():
        base_logps = sequence_logps(base, model_inputs(batch), batch["labels"], batch["seq_ids"], n)[0]
        policy_logps = sequence_logps(policy, model_inputs(batch), batch["labels"], batch["seq_ids"], n)[0]
    assert torch.allclose(ref_logps, base_logps, atol=1e-4)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-2)  # the adapters are on outside the reference


def test_full_finetuning_reference_is_a_frozen_copy_of_ref_model(make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lf_dist.parallel import SingleStrategy
    from lf_dist.train.stages import get_stage
    from lf_dist.worker import build_frozen

    def _reference(cfg, strategy, tokenizer):
        return build_frozen(cfg, get_stage("dpo"), strategy, tokenizer).get("reference")

    other = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    with torch.no_grad():
        other.lm_head.weight.mul_(0.5)
    other.save_pretrained(tmp_path / "sft_model")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    for ref_model, expected in ((None, TINY_MODEL), (str(tmp_path / "sft_model"), tmp_path / "sft_model")):
        cfg = make_cfg(stage="dpo", finetuning_type="full", **({"ref_model": ref_model} if ref_model else {}))
        ref = _reference(cfg, SingleStrategy(cfg), tokenizer).model
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        want = AutoModelForCausalLM.from_pretrained(expected).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in ref.state_dict().items())
    for loss in ("orpo", "simpo"):  # reference-free losses load no reference at all
        cfg = make_cfg(stage="dpo", finetuning_type="full", pref_loss=loss)
        assert _reference(cfg, SingleStrategy(cfg), tokenizer) is None


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_dpo_starts_at_log2_because_policy_equals_reference(make_cfg, finetuning_type):
    cfg = make_cfg(
        stage="dpo", dataset="ranking_demo", finetuning_type=finetuning_type, max_steps=2, learning_rate=1e-4
    )
    run(cfg)
    first = _log(cfg.train.output_dir)[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-6) and first["rewards/margins"] == 0.0


@pytest.mark.parametrize("name", ["dpo_lora", "kto_lora", "rm_lora"])
def test_shipped_preference_examples_train_and_log_reward_metrics(tmp_path, name):
    """The shipped examples run as they are (a few steps), from the install `make demo` uses."""
    from lf_dist.cli import main

    from .conftest import ROOT

    out = tmp_path / name
    config = ROOT / "examples" / "tiny" / f"{name}.yaml"
    assert main(["train", str(config), f"output_dir={out}", "max_steps=4", "eval_steps=2", "disable_tqdm=true"]) == 0
    log = _log(out)
    assert any("eval_rewards/accuracies" in e for e in log)
    assert all("rewards/accuracies" in e for e in log if "loss" in e)
    assert (out / "adapter_model.safetensors").is_file()


def test_tokenized_path_of_another_stage_is_refused_in_one_line(make_cfg, tmp_path):
    from transformers import AutoTokenizer

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import get_template
    from lf_dist.errors import UserError

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    saved = tmp_path / "tokenized"
    sft = make_cfg("sft", tokenized_path=str(saved), max_samples=8)
    build_datasets(sft, tokenizer, get_template("chatml", tokenizer, sft.data), stage_data(sft))
    dpo = make_cfg("dpo", stage="dpo", dataset="ranking_demo", tokenized_path=str(saved))
    with pytest.raises(UserError, match="holds supervised rows but stage dpo needs pairwise rows"):
        build_datasets(dpo, tokenizer, get_template("chatml", tokenizer, dpo.data), stage_data(dpo))
