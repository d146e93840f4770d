"""Rollouts: keyed Gumbel sampling draws exactly from the processed distribution, with noise that is a function of
(seed, step, prompt, sample, position) alone, so a prompt's completions do not depend on its batch; completion
masks and update rows are laid out as the losses read them; and the temperature-scaled completion log-probs and
entropies equal TRL's GRPO ones."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from lf_dist.data.tokenize import IGNORE_INDEX
from lf_dist.train.online_rl import completion_logps, generate
from lf_dist.train.rollout import (
    Completions,
    HFRollout,
    KeyedGumbel,
    Sampling,
    _completions,
    keyed_uniform,
    sample_keys,
)

from .conftest import TINY_MODEL

N_DRAWS = 20_000
FALSE_ALARM = 1e-6  # each chi-square test fails a correct sampler this rarely
LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.0, -0.5, 1.5, 0.0, 0.5])


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of `counts` against `probs` (regularised upper gamma of df / 2)."""
    expected = counts.sum() * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def _draw(processors, keys: torch.Tensor, logits: torch.Tensor, position: int, prompt_length: int = 5):
    """The argmax of the processed, noised logits of every key at `position` after a prompt."""
    input_ids = torch.ones(len(keys), prompt_length + position, dtype=torch.long)
    return processors(input_ids, logits.expand(len(keys), -1).clone()).argmax(-1)


def test_keyed_gumbel_argmax_is_an_exact_sample_of_the_softmax():
    """20,000 keys: the argmax frequencies fit softmax(logits), at each position, with fresh draws per position."""
    keys = sample_keys(1234, 7, torch.arange(N_DRAWS // 4), 4)
    probs = torch.softmax(LOGITS.double(), -1)
    draws = [_draw(KeyedGumbel(keys, 5), keys, LOGITS, position) for position in (0, 9)]
    for tokens in draws:
        assert _chi_square_p(torch.bincount(tokens, minlength=len(LOGITS)), probs) > FALSE_ALARM
    # independent positions agree as often as two independent draws do: sum p^2
    agree, expected = float((draws[0] == draws[1]).double().mean()), float((probs**2).sum())
    assert abs(agree - expected) < 4 * (expected * (1 - expected) / N_DRAWS) ** 0.5


def test_processed_sampling_keeps_top_k_top_p_and_follows_the_tempered_distribution():
    """temperature 0.7, top_k 3, top_p 0.8: only the top-p set of the top 3 appears, at its renormalised odds."""
    keys = sample_keys(99, 3, torch.arange(N_DRAWS // 2), 2)
    sampling = Sampling(12, temperature=0.7, top_k=3, top_p=0.8)
    tokens = _draw(sampling.processors(keys, 5), keys, LOGITS, position=4)
    # by hand: the 3 largest tempered logits, then the fewest of them whose probability reaches 0.8
    tempered = torch.softmax(LOGITS.double() / 0.7, -1)
    top = tempered.topk(3)
    renormalised = top.values / top.values.sum()
    n_kept = int((renormalised.cumsum(0) < 0.8).sum()) + 1
    kept = top.indices[:n_kept]
    assert n_kept == 2  # the numbers above make top_p drop one of the top 3 and top_k drop the other 5
    counts = torch.bincount(tokens, minlength=len(LOGITS))
    outside = torch.ones(len(LOGITS), dtype=torch.bool)
    outside[kept] = False
    assert counts[outside].sum() == 0
    assert _chi_square_p(counts[kept], tempered[kept] / tempered[kept].sum()) > FALSE_ALARM


def test_keyed_uniforms_are_uniform_in_the_open_interval():
    """Values in (0, 1) with the mean, variance and decile counts of a uniform, and distinct keys per draw."""
    keys = sample_keys(0, 0, torch.arange(500), 4)
    assert keys.unique().numel() == len(keys)
    u = torch.cat([keyed_uniform(keys, position, 64) for position in (0, 1, 50)]).flatten()
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 4 * (1 / 180 / n) ** 0.5  # Var((U - 1/2)^2) = 1/180
    deciles = torch.bincount((u * 10).long(), minlength=10)
    assert _chi_square_p(deciles, torch.full((10,), 0.1)) > FALSE_ALARM
    # position and column each give fresh numbers
    assert not torch.equal(keyed_uniform(keys, 0, 8), keyed_uniform(keys, 1, 8))
    assert keyed_uniform(keys, 0, 64)[:, :8].unique().numel() == len(keys) * 8


def test_a_keys_noise_does_not_depend_on_the_batch_it_is_in():
    """Keys and their uniforms for a subset of prompts, in any order, are the rows the whole batch gives them."""
    indices = torch.tensor([17, 4, 230, 9, 88])
    keys = sample_keys(5, 11, indices, 3)
    order = [3, 0, 4]  # prompts 9, 17, 88, in another order, without the rest
    subset = sample_keys(5, 11, indices[order], 3)
    rows = torch.tensor([3 * i + s for i in order for s in range(3)])
    assert torch.equal(subset, keys[rows])
    for position in (0, 6):
        assert torch.equal(keyed_uniform(subset, position, 32), keyed_uniform(keys, position, 32)[rows])
    # the vocabulary width only adds columns: a column's number does not depend on how many follow it
    assert torch.equal(keyed_uniform(keys, 2, 1168)[:, :32], keyed_uniform(keys, 2, 32))
    # the prompt length only shifts where positions start counting (left padding of the batch)
    scores = torch.zeros(len(keys), 32)
    short = KeyedGumbel(keys, 4)(torch.ones(len(keys), 4 + 2, dtype=torch.long), scores)
    long = KeyedGumbel(keys, 10)(torch.ones(len(keys), 10 + 2, dtype=torch.long), scores)
    assert torch.equal(short, long)
    # each of seed, step, prompt and sample makes other keys
    others = [sample_keys(6, 11, indices, 3), sample_keys(5, 12, indices, 3), sample_keys(5, 11, indices + 1, 3)]
    for other in others:
        assert not bool((other == keys).any())


class _CPUStrategy:
    """What HFRollout reads of a strategy: its device, and `generate` as `Strategy.generate` does it."""

    device = torch.device("cpu")

    def generate(self, model, prompts: dict, **gen) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**prompts, **gen)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    return tokenizer, model


PROMPTS = {
    11: "The capital of France is a city where",
    42: "Hi",
    7: "Write a short poem about the sea, the sky and the wind",
}


def _rollout(tiny, indices: list[int], seed: int = 3, step: int = 5) -> dict[int, list[list[int]]]:
    """Each prompt's 2 completions (ids up to their stop), generated with the prompts of `indices` as one batch."""
    tokenizer, model = tiny
    enc = tokenizer([PROMPTS[i] for i in indices], padding=True, padding_side="left", return_tensors="pt")
    batch = {**enc, "index": torch.tensor(indices), "answer": [""] * len(indices)}
    ctx = types.SimpleNamespace(
        tokenizer=tokenizer,
        strategy=_CPUStrategy(),
        model=model,
        stop_ids=[tokenizer.eos_token_id],
        seed=seed,
        step=step,
        totals={},
    )
    (rollout,) = generate(ctx, [batch], 2, Sampling(12, temperature=1.0), engine=HFRollout())
    c = rollout.completions
    rows = [row[: int(n)].tolist() for row, n in zip(c.ids, c.lengths)]
    return {i: rows[2 * k : 2 * k + 2] for k, i in enumerate(indices)}


def test_a_prompts_completions_do_not_depend_on_its_batch(tiny):
    """Prompt 42 (the shortest, left-padded most in the batch) draws the same completions alone, first or last;
    another step or seed draws others."""
    lengths = {i: len(tiny[0](text)["input_ids"]) for i, text in PROMPTS.items()}
    assert lengths[42] < min(lengths[11], lengths[7]) and lengths[11] != lengths[7]
    together = _rollout(tiny, [11, 42, 7])
    assert _rollout(tiny, [42]) == {42: together[42]}
    reordered = _rollout(tiny, [7, 11, 42])
    assert reordered == together
    assert together[42][0] != together[42][1]  # the two samples are two draws
    assert all(len(row) > 0 for rows in together.values() for row in rows)
    assert _rollout(tiny, [42], step=6)[42] != together[42]
    assert _rollout(tiny, [42], seed=4)[42] != together[42]


STOPS = [2, 9]
PAD = 0


def _fabricated() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts and a generate output: row 0 stops (second stop id) at 3, row 1 never, row 2 at 0."""
    prompt_ids = torch.tensor([[0, 0, 31, 32], [41, 42, 43, 44], [0, 0, 0, 51]])
    prompt_mask = (prompt_ids != PAD).long()
    new = torch.tensor(
        [
            [101, 102, 103, 9, 104, 2],  # tokens after the stop are junk that must not survive
            [201, 202, 203, 204, 205, 206],
            [2, 301, 9, 302, 303, 304],
        ]
    )
    return prompt_ids, prompt_mask, torch.cat([prompt_ids, new], 1)


def test_completion_mask_ends_at_the_first_stop_token_and_marks_truncation():
    """`mask` covers tokens up to and including the first stop, ids after it are pad, truncated = no stop."""
    prompt_ids, prompt_mask, output = _fabricated()
    c = _completions(prompt_ids, prompt_mask, output, STOPS, PAD)
    assert c.mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    assert c.lengths.tolist() == [4, 6, 1]
    assert c.truncated.tolist() == [False, True, False]
    assert c.ids.tolist() == [
        [101, 102, 103, 9, PAD, PAD],
        [201, 202, 203, 204, 205, 206],
        [2, PAD, PAD, PAD, PAD, PAD],
    ]
    assert torch.equal(c.prompt_ids, prompt_ids) and torch.equal(c.prompt_mask, prompt_mask)


def test_an_output_without_new_tokens_has_empty_truncated_completions():
    """No new tokens (an engine that returns the prompts alone): zero lengths, an empty mask, none ended."""
    prompt_ids, prompt_mask, _ = _fabricated()
    empty = _completions(prompt_ids, prompt_mask, prompt_ids.clone(), STOPS, PAD)
    assert empty.lengths.tolist() == [0, 0, 0] and empty.ids.shape == (3, 0) and empty.truncated.all()


def test_update_rows_are_real_prompt_tokens_then_the_completion_labelled_alone():
    """`Completions.batch`: no padding inside a row, right padding after, labels on completion tokens only."""
    prompt_ids, prompt_mask, output = _fabricated()
    batch = _completions(prompt_ids, prompt_mask, output, STOPS, PAD).batch(PAD)
    x = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [31, 32, 101, 102, 103, 9, PAD, PAD, PAD, PAD],
        [41, 42, 43, 44, 201, 202, 203, 204, 205, 206],
        [51, 2, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert batch["labels"].tolist() == [
        [x, x, 101, 102, 103, 9, x, x, x, x],
        [x, x, x, x, 201, 202, 203, 204, 205, 206],
        [x, 2, x, x, x, x, x, x, x, x],
    ]


def _trl_logps_and_entropies(c: Completions, temperature: float):
    """TRL GRPO's per-token log-probs and entropies of the completions (its model patched as GRPOTrainer patches
    it), flat over the completion mask, row-major."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    fake_self = types.SimpleNamespace(accelerator=accelerator)  # what the method and its profiling read
    input_ids = torch.cat([c.prompt_ids, c.ids], 1)
    attention_mask = torch.cat([c.prompt_mask, c.mask], 1)
    with torch.no_grad():
        logps, entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            fake_self, model, input_ids, attention_mask, c.ids.shape[1], batch_size=None, compute_entropy=True
        )
    keep = c.mask.bool()
    return logps[keep], entropy[keep]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_and_entropies_equal_trls(tiny, temperature):
    """Our right-padded rows and TRL's left-padded prompts + right-padded completions give the same tempered
    log-probs and entropies of every completion token (to 1e-5)."""
    _, model = tiny
    g = torch.Generator().manual_seed(0)
    prompt_lengths, completion_lengths = [3, 9, 6, 1], [7, 2, 10, 5]
    width_p, width_c = max(prompt_lengths), max(completion_lengths)
    prompt_ids = torch.zeros(4, width_p, dtype=torch.long)
    ids = torch.zeros(4, width_c, dtype=torch.long)
    for row, (p, n) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt_ids[row, width_p - p :] = torch.randint(3, 1168, (p,), generator=g)
        ids[row, :n] = torch.randint(3, 1168, (n,), generator=g)
    ids[0, 6] = 2  # one completion ends with its stop token, the others are cut at their lengths
    arange = torch.arange(width_c)[None]
    mask = (arange < torch.tensor(completion_lengths)[:, None]).long()
    c = Completions(prompt_ids, (prompt_ids != 0).long(), ids, mask, torch.tensor([False, True, True, True]))

    with torch.no_grad():
        logps, entropy, scored, _ = completion_logps(model, c.batch(0), temperature)
    trl_logps, trl_entropy = _trl_logps_and_entropies(c, temperature)
    assert int(scored.sum()) == sum(completion_lengths) == len(trl_logps)
    torch.testing.assert_close(logps, trl_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, trl_entropy, rtol=0, atol=1e-5)
    # the temperature is applied: at 0.7 the log-probs are not the untempered ones
    if temperature != 1.0:
        plain, _, _, _ = completion_logps(model, c.batch(0), 1.0)
        assert (plain - logps).abs().max() > 1e-2
