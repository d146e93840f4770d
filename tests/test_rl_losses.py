"""The RL loss formulas equal TRL's on fixed fp32 tensors, within 1e-6.

GRPO: TRL 1.16's own `GRPOTrainer._generate_and_score_completions` (advantages, logged reward stats) and
`GRPOTrainer._compute_loss` (loss, gradient, logged KL and clip ratios) run on a stand-in `self` that has only
the attributes those methods read, with generation, reward functions and the model forward replaced by fixed
tensors. PPO: TRL 0.9.6 (no longer shipped) is re-typed below from its published `core.py` / `ppo_trainer.py`.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lf_dist.train import rl_losses as rl

TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _close(ours, theirs) -> None:
    torch.testing.assert_close(
        torch.as_tensor(ours, dtype=torch.float64),
        torch.as_tensor(theirs, dtype=torch.float64),
        atol=TOL,
        rtol=0,
        equal_nan=True,
    )


@pytest.fixture(scope="module")
def grpo_trainer():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


def _accelerator() -> SimpleNamespace:
    """One process: gather and reduce are the identity."""
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        process_index=0,
        gather=lambda t: t,
        reduce=lambda t, reduction="sum": t,
    )


# -- GRPO advantages -------------------------------------------------------------------------------------------------
def _rewards_per_func() -> torch.Tensor:
    """Five groups of four completions, two reward functions; NaN = the function returned None."""
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(20, 2, generator=gen)
    nan = float("nan")
    r[4:8] = torch.tensor([1.0, 0.5])  # a group of equal rewards: std 0
    r[8, :] = nan  # unscorable: out of its group's baseline, advantage 0
    r[10, 1] = nan  # one function unscored: the other's reward counts alone
    r[13, 0] = nan
    r[16:20] = nan  # a group with nothing scorable
    return r


def _trl_generate_and_score(trainer_cls, rewards_per_func, weights, num_generations, scale_rewards):
    """TRL's own advantage computation, generation and reward functions replaced by fixed outputs."""
    n = rewards_per_func.size(0)
    completion_ids = [[7] * (1 + i % 3) for i in range(n)]

    def generate(prompts):
        return [[5, 6]] * n, completion_ids, None, ["c"] * n, None, {}, None, [None] * n

    fake = SimpleNamespace(
        accelerator=_accelerator(),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        args=SimpleNamespace(
            per_device_train_batch_size=n,
            gradient_checkpointing_kwargs=None,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
        ),
        environment_factories=None,
        environments=None,
        tools=None,
        _generate=generate,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_iterations=1,
        use_vllm=False,
        beta=0.0,
        _calculate_rewards=lambda inputs, prompts, completions, ids: rewards_per_func.clone(),
        num_generations=num_generations,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=weights,
        scale_rewards=scale_rewards,
        reward_func_names=[f"r{i}" for i in range(rewards_per_func.size(1))],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    out = trainer_cls._generate_and_score_completions(fake, [{"prompt": "p"}] * n)
    return out["advantages"], {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("num_generations", [4, 1])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl(grpo_trainer, scale_rewards, num_generations):
    from trl.trainer.utils import nanstd

    per_func, weights = _rewards_per_func(), torch.tensor([1.0, 0.5])
    theirs, metrics = _trl_generate_and_score(grpo_trainer, per_func, weights, num_generations, scale_rewards)

    rewards = rl.weighted_rewards(per_func, weights)
    advantages, std = rl.group_advantages(rewards, num_generations, scale_rewards)
    _close(advantages, theirs)
    assert not advantages.isnan().any()
    assert (advantages[8] == 0) and (advantages[16:] == 0).all()  # unscorable rows carry no signal
    _close(torch.nanmean(rewards), metrics["reward"])
    _close(torch.isclose(std, torch.zeros_like(std)).float().mean(), metrics["frac_reward_zero_std"])
    if scale_rewards == "batch":
        _close(std, nanstd(rewards).expand_as(rewards))
    elif num_generations > 1:
        _close(std, nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations))
        assert (std[4:8] == 0).all() and std[16:].isnan().all()


def test_weighted_rewards_skip_none_and_mark_unscorable_rows():
    per_func = _rewards_per_func()
    rewards = rl.weighted_rewards(per_func, torch.tensor([1.0, 0.5]))
    _close(rewards[10], per_func[10, 0])
    _close(rewards[13], 0.5 * per_func[13, 1])
    assert rewards[8].isnan() and rewards[16:].isnan().all() and not rewards[:8].isnan().any()


# -- GRPO loss -------------------------------------------------------------------------------------------------------
B, T, MAX_COMPLETION = 6, 10, 16


def _grpo_tensors() -> dict:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([10, 7, 8, 1, 0, 5])  # ragged, and a row masked out entirely (truncated)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    logps = -3 * torch.rand(B, T, generator=gen)
    return {
        "mask": mask,
        "logps": logps,
        "old_logps": logps + 0.3 * torch.randn(B, T, generator=gen),  # ratios on both sides of the clip range
        "ref_logps": logps + 0.2 * torch.randn(B, T, generator=gen),
        "entropies": torch.rand(B, T, generator=gen),
        "advantages": torch.tensor([0.0, -0.7, 1.3, 2.1, -1.5, -0.4]),  # row 0: ratios out of range, not clipped
    }


def _trl_compute_loss(trainer_cls, x, loss_type, beta, epsilon_high, bias_correction_kl):
    """TRL's `_compute_loss` with the model forward replaced by fixed log-probs; returns (loss, grad, metrics)."""
    logps = x["logps"].clone().requires_grad_(True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, x["entropies"], None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.2 if epsilon_high is None else epsilon_high,  # TRL's __init__: None means epsilon
        args=SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=1),
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION,
        accelerator=_accelerator(),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    mask = x["mask"]
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": x["advantages"],
        "num_items_in_batch": mask.sum(),
        "old_per_token_logps": x["old_logps"],
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = x["ref_logps"]
    loss = trainer_cls._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("bias_correction_kl", [False, True], ids=["kl", "kl-bias-corrected"])
@pytest.mark.parametrize("epsilon_high", [None, 0.28], ids=["eps-sym", "eps-high"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_gradient_and_clip_ratios_equal_trl(grpo_trainer, loss_type, beta, epsilon_high, bias_correction_kl):
    x = _grpo_tensors()
    loss, grad, metrics = _trl_compute_loss(grpo_trainer, x, loss_type, beta, epsilon_high, bias_correction_kl)

    logps = x["logps"].clone().requires_grad_(True)
    ref = x["ref_logps"] if beta else None
    per_token, kl, ratio = rl.grpo_token_loss(
        logps, x["old_logps"], ref, x["advantages"], beta, 0.2, epsilon_high, bias_correction_kl
    )
    total, units = rl.grpo_reduce(per_token, x["mask"], loss_type, MAX_COMPLETION)
    (total / units).backward()
    _close(total.detach() / units, loss)
    _close(logps.grad, grad)

    assert (kl is None) == (beta == 0.0)
    if beta:
        mask = x["mask"].float()
        _close((kl.detach() * mask).sum() / mask.sum(), metrics["kl"])
    clipped = rl.clip_fractions(ratio, x["advantages"], x["mask"], 0.2, 0.2 if epsilon_high is None else epsilon_high)
    for key, (num, count) in clipped.items():
        _close(num / count, metrics[key])
    assert clipped["clip_ratio/low_mean"][0] > 0 and clipped["clip_ratio/high_mean"][0] > 0  # both sides exercised
    assert ratio[0].min() < 0.8 and ratio[0].max() > 1.28  # ...and a zero advantage is never counted


def test_grpo_on_policy_ratio_is_one_with_the_policy_gradient():
    x = _grpo_tensors()
    logps = x["logps"].clone().requires_grad_(True)
    per_token, _, ratio = rl.grpo_token_loss(logps, None, None, x["advantages"], 0.0, 0.2)
    assert torch.equal(ratio, torch.ones_like(ratio))
    total, units = rl.grpo_reduce(per_token, x["mask"], "dapo", MAX_COMPLETION)
    total.backward()
    _close(logps.grad, -x["advantages"].unsqueeze(1) * x["mask"])  # d(-ratio * A)/d logp = -A at ratio 1


def test_grpo_reduce_units_add_up_to_the_global_batch():
    x = _grpo_tensors()
    per_token, _, _ = rl.grpo_token_loss(x["logps"], x["old_logps"], None, x["advantages"], 0.0, 0.2)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        whole = rl.grpo_reduce(per_token, x["mask"], loss_type, MAX_COMPLETION)
        parts = [
            rl.grpo_reduce(per_token[s], x["mask"][s], loss_type, MAX_COMPLETION) for s in (slice(0, 3), slice(3, B))
        ]
        _close(sum(p[0] for p in parts) / sum(p[1] for p in parts), whole[0] / whole[1])
        assert whole[1].dtype == torch.float32


# -- PPO: TRL 0.9.6, re-typed ----------------------------------------------------------------------------------------
def _trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def _trl_masked_var(values, mask, unbiased=True):
    mean = _trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = _trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def _trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = _trl_masked_mean(values, mask), _trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _trl_compute_rewards(kl_coef, scores, logprobs, ref_logprobs, masks):
    rewards, non_score_rewards, kls = [], [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = logprob - ref_logprob  # kl_penalty "kl"
        kls.append(kl)
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards), torch.stack(kls)


def _trl_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = _trl_masked_whiten(rewards, mask, shift_mean=False)
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, mask)
    advantages = advantages.detach()
    return values, advantages, returns


def _trl_loss(old_logprobs, values, vpreds, logprobs, mask, advantages, returns, cliprange=0.2, cliprange_value=0.2):
    """PPOTrainer.loss (vf_coef 0.1, ratio_threshold 10); returns (pg_loss, vf_loss, loss, stats)."""
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * _trl_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = _trl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = _trl_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = _trl_masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)
    loss = pg_loss + 0.1 * vf_loss
    avg_ratio = _trl_masked_mean(ratio, mask).item()
    if avg_ratio > 10.0:
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
    return pg_loss, vf_loss, loss, {"pg_clipfrac": pg_clipfrac, "vf_clipfrac": vf_clipfrac, "ratio": avg_ratio}


class _TrlAdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


class _TrlRunningMoments:
    """Single process (accelerator.use_distributed False)."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0, 1, 1, 1e-24

    @torch.no_grad()
    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += delta * xs_count / tot_count
        self.var = tot_sum / tot_count
        self.std = (self.var * tot_count / (tot_count - 1)).float().sqrt()
        self.count = tot_count
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).float().sqrt().item()


def _trl_score_norm(running, scores):
    """PPOTrainer.step with use_score_scaling and use_score_norm."""
    kwargs = dict(dtype=scores.dtype, device=scores.device)
    factor = running.std.to(**kwargs) + torch.finfo(scores.dtype).eps
    return (scores - running.mean.to(**kwargs)) / factor


# -- PPO tests -------------------------------------------------------------------------------------------------------
def _ppo_tensors(batch: int = 5, seed: int = 2) -> dict:
    """Rows as TRL 0.9.6 laid them out: query positions and right padding masked, response in between."""
    gen = torch.Generator().manual_seed(seed)
    starts, ends = torch.tensor([2, 3, 1, 4, 2])[:batch], torch.tensor([12, 7, 5, 11, 3])[:batch]
    pos = torch.arange(12)
    mask = ((pos >= starts.unsqueeze(1)) & (pos < ends.unsqueeze(1))).long()
    logps = -2 * torch.rand(batch, 12, generator=gen)
    return {
        "mask": mask,
        "scores": torch.randn(batch, generator=gen) * 2 + 1,
        "logps": logps,
        "old_logps": logps + 0.25 * torch.randn(batch, 12, generator=gen),
        "ref_logps": logps + 0.3 * torch.randn(batch, 12, generator=gen),
        "values": torch.randn(batch, 12, generator=gen),
        "vpreds": torch.randn(batch, 12, generator=gen),
    }


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_statistics_equal_trl(shift_mean):
    x = _ppo_tensors()
    values, mask = x["values"] * 3 + 1, x["mask"]
    _close(rl.masked_mean(values, mask), _trl_masked_mean(values, mask))
    _close(rl.masked_mean(values, mask, axis=1), _trl_masked_mean(values, mask, axis=1))
    _close(rl.masked_var(values, mask), _trl_masked_var(values, mask))
    _close(rl.masked_var(values, mask, unbiased=False), _trl_masked_var(values, mask, unbiased=False))
    _close(rl.masked_whiten(values, mask, shift_mean), _trl_masked_whiten(values, mask, shift_mean))
    moments = rl.masked_moments(values, mask)
    assert moments.dtype == torch.float64
    v = values.double()
    _close(moments, [(v * mask).sum(), (v**2 * mask).sum(), mask.sum()])


def test_kl_penalized_rewards_equal_trl_inside_the_mask():
    x = _ppo_tensors()
    mask = x["mask"]
    theirs, _, their_kl = _trl_compute_rewards(0.2, x["scores"], x["logps"], x["ref_logps"], mask)
    rewards, kl = rl.kl_penalized_rewards(x["scores"], x["logps"], x["ref_logps"], mask, 0.2)
    _close(rewards, theirs * mask)
    _close(kl, their_kl * mask)
    last = torch.tensor([11, 6, 4, 10, 2])
    _close(rewards[torch.arange(5), last] + 0.2 * kl[torch.arange(5), last], x["scores"])


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_gae_equals_trl(whiten_rewards):
    x = _ppo_tensors()
    mask = x["mask"]
    trl_rewards, _, _ = _trl_compute_rewards(0.2, x["scores"], x["logps"], x["ref_logps"], mask)
    _, their_adv, their_returns = _trl_compute_advantages(x["values"], trl_rewards, mask, 1.0, 0.95, whiten_rewards)

    rewards, _ = rl.kl_penalized_rewards(x["scores"], x["logps"], x["ref_logps"], mask, 0.2)
    values = x["values"].clone().requires_grad_(True)
    advantages, returns = rl.gae(rewards, values, mask, 1.0, 0.95, whiten_rewards)
    _close(advantages, their_adv)
    _close(returns.detach(), their_returns)
    assert not advantages.requires_grad
    m = mask.bool()
    _close(advantages[m].mean(), 0.0)
    _close(advantages[m].std(), 1.0)


def _all_reduce(world: int):
    """`reduce` callables of `world` threads that sum their tensors, as an all-reduce over ranks would."""
    barrier, slots = threading.Barrier(world, timeout=30), [None] * world

    def make(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = torch.stack(slots).sum(0)
            barrier.wait()  # nobody overwrites a slot before all have read
            return total

        return reduce

    return [make(r) for r in range(world)]


def _on_ranks(fn, shards):
    reducers = _all_reduce(len(shards))
    with ThreadPoolExecutor(len(shards)) as pool:
        return list(pool.map(lambda r: fn(shards[r], reducers[r]), range(len(shards))))


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_split_batch_whitening_with_reduce_equals_whole_batch(whiten_rewards):
    x = _ppo_tensors()
    rewards, _ = rl.kl_penalized_rewards(x["scores"], x["logps"], x["ref_logps"], x["mask"], 0.2)
    whole = rl.gae(rewards, x["values"], x["mask"], whiten_rewards=whiten_rewards)
    shards = [slice(0, 3), slice(3, 5)]  # unequal halves: different row and token counts per rank

    def rank(s, reduce):
        return rl.gae(rewards[s], x["values"][s], x["mask"][s], whiten_rewards=whiten_rewards, reduce=reduce)

    parts = _on_ranks(rank, shards)
    _close(torch.cat([p[0] for p in parts]), whole[0])
    _close(torch.cat([p[1] for p in parts]), whole[1])
    local = rl.gae(rewards[shards[0]], x["values"][shards[0]], x["mask"][shards[0]], whiten_rewards=whiten_rewards)
    assert (local[0] - whole[0][shards[0]]).abs().max() > 1e-2  # without reduce the halves would differ

    whitened = _on_ranks(lambda s, reduce: rl.masked_whiten(x["values"][s], x["mask"][s], reduce=reduce), shards)
    _close(torch.cat(whitened), _trl_masked_whiten(x["values"], x["mask"]))


def test_ppo_losses_equal_trl_loss_and_gradient():
    x = _ppo_tensors()
    rewards, _ = rl.kl_penalized_rewards(x["scores"], x["logps"], x["ref_logps"], x["mask"], 0.2)
    advantages, returns = rl.gae(rewards, x["values"], x["mask"])
    values = x["values"] * x["mask"]  # what TRL's compute_advantages hands to the loss
    mask = x["mask"]

    logps_t, vpreds_t = x["logps"].clone().requires_grad_(True), x["vpreds"].clone().requires_grad_(True)
    pg_loss, vf_loss, loss, stats = _trl_loss(x["old_logps"], values, vpreds_t, logps_t, mask, advantages, returns)
    loss.backward()

    logps, vpreds = x["logps"].clone().requires_grad_(True), x["vpreds"].clone().requires_grad_(True)
    out = rl.ppo_losses(logps, x["old_logps"], values, vpreds, advantages, returns, mask)
    tokens = out["tokens"]
    _close(out["pg_sum"].detach() / tokens, pg_loss)
    _close(out["vf_sum"].detach() / tokens, vf_loss)
    _close(out["pg_sum"].detach() / tokens + 0.1 * out["vf_sum"].detach() / tokens, loss)
    (out["loss_sum"] / tokens).backward()
    _close(logps.grad, logps_t.grad)
    _close(vpreds.grad, vpreds_t.grad)
    _close(out["pg_clipped"] / tokens, stats["pg_clipfrac"])
    _close(out["vf_clipped"] / tokens, stats["vf_clipfrac"])
    _close(out["ratio_sum"] / tokens, stats["ratio"])
    assert 0 < out["pg_clipped"] < tokens and 0 < out["vf_clipped"] < tokens
    assert not rl.ratio_skipped(out["ratio_sum"], tokens)


def test_ratio_skip_matches_trl_zeroed_loss():
    x = _ppo_tensors()
    mask = x["mask"]
    advantages, returns = rl.gae(torch.zeros_like(x["values"]), x["values"], mask)
    far_old = x["logps"] - 3.0  # ratio e^3 ~ 20 > 10
    _, _, loss, _ = _trl_loss(far_old, x["values"], x["vpreds"], x["logps"], mask, advantages, returns)
    out = rl.ppo_losses(x["logps"], far_old, x["values"], x["vpreds"], advantages, returns, mask)
    assert loss == 0 and rl.ratio_skipped(out["ratio_sum"], out["tokens"])
    assert not rl.ratio_skipped(9.9 * out["tokens"], out["tokens"]) and rl.ratio_skipped(10.1, 1.0)


def test_adaptive_kl_moves_toward_target_clipped_and_equals_trl():
    for current, n in [(9.0, 256), (3.0, 64), (100.0, 512), (0.0, 512), (6.3, 1000)]:
        ours, theirs = rl.AdaptiveKL(0.2, 6.0, 10000), _TrlAdaptiveKLController(0.2, 6.0, 10000)
        ours.update(current, n)
        theirs.update(current, n)
        _close(ours.value, theirs.value)
    kl = rl.AdaptiveKL(0.2, 6.0, 10000)
    kl.update(7.0, 100)
    assert kl.value > 0.2  # KL above target: penalise more
    kl = rl.AdaptiveKL(0.2, 6.0, 10000)
    kl.update(5.0, 100)
    assert kl.value < 0.2  # below: penalise less
    for current, sign in [(100.0, 1), (0.0, -1)]:  # at most ±20% x n / horizon
        kl = rl.AdaptiveKL(0.2, 6.0, 10000)
        kl.update(current, 500)
        assert kl.value == pytest.approx(0.2 * (1 + sign * 0.2 * 500 / 10000), abs=1e-12)

    restored = rl.AdaptiveKL()
    restored.load_state_dict(json.loads(json.dumps(kl.state_dict())))
    assert restored.state_dict() == kl.state_dict()


def test_running_moments_and_score_norm_equal_trl():
    gen = torch.Generator().manual_seed(3)
    ours, theirs = rl.RunningMoments(), _TrlRunningMoments()
    for n, shift in [(8, 2.0), (5, -1.0), (3, 0.5)]:
        scores = torch.randn(n, generator=gen) * 1.5 + shift
        _close(ours.update(scores), theirs.update(scores))
        _close(ours.normalize(scores), _trl_score_norm(theirs, scores))
        for key in ("mean", "std", "var", "count"):
            _close(getattr(ours, key), getattr(theirs, key))

    restored = rl.RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(ours.state_dict())))
    assert restored.state_dict() == ours.state_dict()


def test_running_moments_split_batch_with_reduce_equals_whole_batch():
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(7, generator=gen) + 1, torch.randn(7, generator=gen) - 2]
    whole = rl.RunningMoments()
    shards = [slice(0, 4), slice(4, 7)]
    ranks = [rl.RunningMoments(), rl.RunningMoments()]
    for scores in batches:
        expected = whole.update(scores)
        shards_of_batch = [scores[s] for s in shards]
        got = _on_ranks(lambda r, reduce, xs=shards_of_batch: ranks[r].update(xs[r], reduce), [0, 1])
        for stats in got:
            _close(stats, expected)
    for running in ranks:
        for key in ("mean", "std", "var", "count"):
            _close(getattr(running, key), getattr(whole, key))
