"""Each preference loss, with its rewards and log-probs, equals TRL's on a fixed batch and a fixed tiny model.

TRL computes its numbers in the same run: a real DPOTrainer / ORPOTrainer / CPOTrainer (SimPO) / KTOTrainer /
RewardTrainer gets the same token ids through its own collator and its own `compute_loss`; fp32, tolerance 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lf_dist.data.collator import FeedbackCollator, PairwiseCollator
from lf_dist.data.tokenize import IGNORE_INDEX
from lf_dist.train.losses import Frozen
from lf_dist.train.preference import DPOLoss, KTOLoss, RewardLoss
from tests.conftest import TINY_MODEL as MODEL
from tests.conftest import stage_data

trl = pytest.importorskip("trl")
TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def models():
    """(policy, reference): the tiny model and a copy nudged by fixed noise, so rewards are not zero."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return policy.train(), ref.eval()


def _rows(make_cfg, tokenizer, stage: str, dataset: str, n: int) -> list[dict]:
    """The first n records of a demo dataset through lf-dist's own preprocessing."""
    from lf_dist.data import build_datasets
    from lf_dist.data.templates import get_template

    cfg = make_cfg(stage=stage, dataset=dataset, max_samples=n, cutoff_len=256)
    template = get_template("chatml", tokenizer, cfg.data)
    train = build_datasets(cfg, tokenizer, template, stage_data(cfg)).train
    return [train[i] for i in range(len(train))]


def _split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    start = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    return ids[:start], ids[start:]


def _trl_pairs(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        prompt, chosen = _split(r["chosen_input_ids"], r["chosen_labels"])
        prompt_r, rejected = _split(r["rejected_input_ids"], r["rejected_labels"])
        assert prompt == prompt_r
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def _ours(stage, model, batch) -> tuple[float, dict]:
    loss, metrics = stage(model, batch)
    return float(loss) / stage.num_units(batch), stage.summarize(metrics)


def _text_dataset():
    import datasets

    return datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})


def _trainer(cls, config_cls, model, tokenizer, tmp_path, ref_model=None, **config):
    args = config_cls(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **config)
    kwargs = {"ref_model": ref_model} if ref_model is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, args=args, train_dataset=_text_dataset(), processing_class=tokenizer, **kwargs)
    trainer.model.train()
    return trainer


def _trl_metrics(trainer) -> dict:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _close(ours: float, theirs: float) -> None:
    assert ours == pytest.approx(theirs, abs=TOL, rel=TOL)


PAIR_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


@pytest.mark.parametrize(
    "loss_type,label_smoothing,ftx",
    [("sigmoid", 0.0, 0.0), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0), ("sigmoid", 0.2, 0.0), ("sigmoid", 0.0, 0.5)],
    ids=["sigmoid", "hinge", "ipo", "sigmoid-label-smoothing", "sigmoid-ftx"],
)
def test_dpo_losses_match_trl(make_cfg, tokenizer, models, tmp_path, loss_type, label_smoothing, ftx):
    from trl import DPOConfig, DPOTrainer

    policy, ref = models
    rows = _rows(make_cfg, tokenizer, "dpo", "ranking_demo", 6)
    if ftx:  # TRL's "sft" term is a token mean over the batch: equal to our per-pair mean when lengths agree
        lengths = [sum(x != IGNORE_INDEX for x in r["chosen_labels"]) for r in rows]
        rows = [r for r, n in zip(rows, lengths) if n == max(set(lengths), key=lengths.count)]
        assert len(rows) >= 2
    beta = 0.1
    stage = DPOLoss(loss_type, beta, ftx, label_smoothing, 0.5, Frozen(copy.deepcopy(ref)))
    loss, metrics = _ours(stage, copy.deepcopy(policy), PairwiseCollator(tokenizer.pad_token_id)(rows))

    if label_smoothing:  # TRL 1.x dropped cDPO from "sigmoid"; cDPO = 2(1-e) sigmoid - (1-2e) robust
        eps = label_smoothing
        types, weights = ["sigmoid", "robust"], [2 * (1 - eps), -(1 - 2 * eps)]
    elif ftx:
        types, weights = ["sigmoid", "sft"], [1.0, ftx]
    else:
        types, weights = [loss_type], None
    trainer = _trainer(
        DPOTrainer,
        DPOConfig,
        copy.deepcopy(policy),
        tokenizer,
        tmp_path,
        ref_model=copy.deepcopy(ref),
        beta=beta,
        loss_type=types,
        loss_weights=weights,
        label_smoothing=label_smoothing,
    )
    trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(_trl_pairs(rows))))
    theirs = _trl_metrics(trainer)
    _close(loss, trl_loss)
    for key in PAIR_KEYS + ("logps/rejected",):
        _close(metrics[key], theirs[key])
    assert abs(metrics["rewards/margins"]) > 1e-3  # the policy really differs from the reference


def _legacy_pairs(rows: list[dict]) -> list[dict]:
    """The tokenized-row layout of TRL's ORPO / CPO trainers (prompt masked with -100 in the labels)."""
    out = []
    for r in rows:
        prompt, _ = _split(r["chosen_input_ids"], r["chosen_labels"])
        out.append(
            {
                "prompt_input_ids": prompt,
                "prompt_attention_mask": [1] * len(prompt),
                **{f"{s}_{k}": r[f"{s}_{k}"] for s in ("chosen", "rejected") for k in ("input_ids", "labels")},
                **{f"{s}_attention_mask": [1] * len(r[f"{s}_input_ids"]) for s in ("chosen", "rejected")},
            }
        )
    return out


def test_simpo_matches_trl_cpo(make_cfg, tokenizer, models, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _ = models
    rows = _rows(make_cfg, tokenizer, "dpo", "ranking_demo", 6)
    beta, gamma, eps = 2.0, 0.5, 0.1
    stage = DPOLoss("simpo", beta, 0.0, eps, gamma, None)
    loss, metrics = _ours(stage, copy.deepcopy(policy), PairwiseCollator(tokenizer.pad_token_id)(rows))
    trainer = _trainer(
        CPOTrainer,
        CPOConfig,
        copy.deepcopy(policy),
        tokenizer,
        tmp_path,
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=eps,
    )
    batch = trainer.data_collator(_legacy_pairs(rows))
    trl_loss, theirs = trainer.get_batch_loss_metrics(trainer.model, batch)
    _close(loss, float(trl_loss))
    for key in PAIR_KEYS + ("logps/rejected",):
        _close(metrics[key], theirs[key])


def test_orpo_matches_trl(make_cfg, tokenizer, models, tmp_path):
    """TRL's ORPO takes its NLL over prompt and answer, LLaMA-Factory's (and ours) over the answer only: the
    odds-ratio term, rewards and log-probs must agree exactly, and the NLL term is the answer's mean NLL."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _ = models
    rows = _rows(make_cfg, tokenizer, "dpo", "ranking_demo", 6)
    beta = 0.1
    stage = DPOLoss("orpo", beta, 0.0, 0.0, 0.5, None)
    loss, metrics = _ours(stage, copy.deepcopy(policy), PairwiseCollator(tokenizer.pad_token_id)(rows))
    trainer = _trainer(ORPOTrainer, ORPOConfig, copy.deepcopy(policy), tokenizer, tmp_path, beta=beta)
    trl_loss, theirs = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(_legacy_pairs(rows)))
    _close(metrics["odds_ratio_loss"], -theirs["log_odds_ratio"])
    _close(loss - metrics["sft_loss"], float(trl_loss) - theirs["nll_loss"])  # beta * odds-ratio term
    _close(metrics["sft_loss"], -metrics["logps/chosen"])  # mean answer NLL per pair
    for key in PAIR_KEYS + ("logps/rejected",):
        _close(metrics[key], theirs[key])


def test_kto_matches_trl(make_cfg, tokenizer, models, tmp_path):
    from trl import KTOConfig, KTOTrainer

    policy, ref = models
    rows = _rows(make_cfg, tokenizer, "kto", "kto_demo", 8)
    assert 0 < sum(r["kto_tags"] for r in rows) < len(rows)
    beta, w_good, w_bad = 0.1, 1.0, 1.33
    stage = KTOLoss(beta, 0.0, w_good, w_bad, Frozen(copy.deepcopy(ref)))
    batch = FeedbackCollator(tokenizer.pad_token_id, 256)(rows)
    loss, metrics = _ours(stage, copy.deepcopy(policy), batch)

    examples = []
    for r in rows:
        prompt, answer = _split(r["input_ids"], r["labels"])
        examples.append({"prompt_ids": prompt, "completion_ids": answer, "label": r["kto_tags"]})
    answers = [e["completion_ids"] for e in examples]
    for e, kl in zip(examples, answers[-1:] + answers[:-1]):  # TRL's KL pairing: completions rotated by one
        e["KL_completion_ids"] = kl
    # ...which is what our collator built for its KL rows
    for i, e in enumerate(examples):
        n = len(e["prompt_ids"]) + len(e["KL_completion_ids"])
        assert batch["kl_input_ids"][i, :n].tolist() == e["prompt_ids"] + e["KL_completion_ids"]
    trainer = _trainer(
        KTOTrainer,
        KTOConfig,
        copy.deepcopy(policy),
        tokenizer,
        tmp_path,
        ref_model=copy.deepcopy(ref),
        beta=beta,
        desirable_weight=w_good,
        undesirable_weight=w_bad,
        per_device_train_batch_size=len(rows),
    )
    trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))
    theirs = _trl_metrics(trainer)
    _close(loss, trl_loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        _close(metrics[key], theirs[key])


def test_reward_model_loss_matches_trl(make_cfg, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        MODEL, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
    )
    with torch.no_grad():
        model.score.weight.normal_(std=0.5)  # a head that separates, so the accuracies are not trivial
    rows = _rows(make_cfg, tokenizer, "rm", "ranking_demo", 6)
    loss, metrics = _ours(RewardLoss(), copy.deepcopy(model).train(), PairwiseCollator(tokenizer.pad_token_id)(rows))
    trainer = _trainer(RewardTrainer, RewardConfig, copy.deepcopy(model), tokenizer, tmp_path)
    examples = [{"chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"]} for r in rows]
    trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))
    theirs = _trl_metrics(trainer)
    _close(loss, trl_loss)
    _close(metrics["rewards/accuracies"], theirs["accuracy"])
    _close(metrics["rewards/margins"], theirs["margin"])
