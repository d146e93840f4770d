"""The loss formulas of online RL as pure functions: GRPO as TRL 1.16 computes it, PPO as TRL 0.9.6 did.

GRPO: `weighted_rewards` and `group_advantages` turn reward-function outputs into advantages (TRL's
"sum_then_normalize"), `grpo_token_loss` is the clipped per-token objective with its KL term, `grpo_reduce`
returns a (sum, units) pair per micro-batch and `clip_fractions` the logged clip ratios as (sum, count) pairs.

PPO: `kl_penalized_rewards`, `gae` and `ppo_losses` follow TRL 0.9.6's `compute_rewards`,
`compute_advantages` and `loss`; `AdaptiveKL` and `RunningMoments` its KL controller and score normalizer.

Normalisation over the global batch: losses come back as sums with their units, and the training loop divides the
sum over all micro-batches and ranks by the summed units. On one process and one micro-batch that is TRL's number;
across ranks it is the mean over the whole batch. Whitening and running moments need batch statistics: they take
an optional `reduce` applied to the local (sum, sum of squares, count) tensor — the caller passes an all-reduce
over its data-parallel group — so statistics are those of the global batch, whatever its split across ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# -- GRPO ---------------------------------------------------------------------------------------------------------
def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction; NaN where fewer than two values (TRL's nanstd)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dims, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions [N, F] -> [N]; None (NaN) outputs are skipped, and a row where every
    function returned None is NaN (unscorable) rather than 0, so it stays out of the group baseline."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [N] of the whole generation batch (all ranks: TRL gathers before normalising), each group's
    completions consecutive; returns (advantages, std). `std` is what `frac_reward_zero_std` reads.

    scale_rewards "group" divides by the group's std, "batch" by the batch's, "none" only centres (its std is
    the group's, for logging). Unscorable rows (NaN reward) get advantage 0."""
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', not {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    beta: float,
    epsilon_low: float,
    epsilon_high: float | None = None,
    bias_correction_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Clipped per-token GRPO objective [B, T] (shared by grpo, bnpo, dr_grpo and dapo) plus beta * k3 KL to the
    reference; returns (per_token_loss, per_token_kl or None when beta == 0, ratio).

    old_logps None means on-policy (one update per generation): the ratio is exp(logps - logps.detach()) = 1
    with the policy gradient intact. epsilon_high None means epsilon_low, as in TRL's config."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    old_logps = logps.detach() if old_logps is None else old_logps
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_kl = None
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if bias_correction_kl:  # the KL is estimated on samples of the old policy: reweight to the current one
            per_token_kl = per_token_kl * coef_1
        per_token_loss = per_token_loss + beta * per_token_kl
    return per_token_loss, per_token_kl, coef_1


def grpo_reduce(
    per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, units) of one micro-batch; the loop divides the sum over micro-batches and ranks by the summed
    units. On one process and one micro-batch the quotient is TRL's loss; across them:

    - grpo: per-sequence token mean, units = sequences (TRL: mean of per-micro-batch means; equal when micro-batches
      hold equally many sequences);
    - dapo: token sum, units = tokens: the global token mean, as TRL's `num_items_in_batch` gives;
    - bnpo: the same global token mean (TRL normalises each micro-batch by its own tokens, then averages);
    - dr_grpo: token sum, units = sequences * max_completion_length (a constant per sequence, as TRL).

    A micro-batch may have no tokens: its units are 0 and the loop's global division is where to clamp."""
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    n_seqs = per_token_loss.new_tensor(float(per_token_loss.size(0)))
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), n_seqs
    if loss_type in ("bnpo", "dapo"):
        return masked.sum(), mask.sum().detach()
    if loss_type == "dr_grpo":
        return masked.sum(), n_seqs * max_completion_length
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")


def clip_fractions(
    coef_1: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) over tokens for TRL's clip_ratio/low_mean, high_mean and region_mean: tokens whose ratio is
    outside the trust region on the side where clipping removes the gradient."""
    coef_1 = coef_1.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    mask = mask.float()
    count = mask.sum()
    return {
        "clip_ratio/low_mean": ((low.float() * mask).sum(), count),
        "clip_ratio/high_mean": ((high.float() * mask).sum(), count),
        "clip_ratio/region_mean": (((low | high).float() * mask).sum(), count),
    }


# -- PPO: statistics ----------------------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of the masked values (over `axis`, else all)."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked values, with Bessel's correction n / (n - 1) when unbiased."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("masked_var: the mask is empty")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of the masked values, float64: what ranks all-reduce for global statistics."""
    mask = mask.bool()
    x = torch.where(mask, values.detach().double(), 0.0)  # masked slots may hold anything, even inf
    return torch.stack([x.sum(), (x * x).sum(), mask.sum().double()])


def _mean_var(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and unbiased variance, over the global batch when `reduce` sums the moments across ranks."""
    moments = masked_moments(values, mask)
    if reduce is not None:
        moments = reduce(moments).to(values.device)  # an all-reduce returns them on the process group's device
    total, squares, n = moments.unbind()
    if n.item() == 0:
        raise ValueError("masked_whiten: the mask is empty")
    mean = total / n
    var = (squares / n - mean * mean).clamp(min=0.0) * (n / (n - 1))
    return mean.to(values.dtype), var.to(values.dtype)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce | None = None
) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with masked statistics; the mean is added back unless shift_mean.
    Values outside the mask are transformed too (they are ignored downstream)."""
    mean, var = _mean_var(values, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# -- PPO: rewards, advantages, losses -------------------------------------------------------------------------------
def kl_penalized_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: -kl_coef * (logps - ref_logps), plus the sequence score at each row's last
    mask-true position; returns (rewards, kl), both 0 outside the mask (TRL leaves them there, then masks)."""
    mask = mask.bool()
    kl = torch.where(mask, logps - ref_logps, 0.0)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)  # -1: a row without tokens gets no score
    at_last = positions.unsqueeze(0) == last
    rewards = rewards + at_last * scores.to(rewards.dtype).unsqueeze(1)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [B, T]; returns (whitened advantages, detached; returns).
    `reduce` makes the whitening statistics those of the global batch."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    last = 0.0
    reversed_advantages = []
    length = rewards.size(-1)
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask, reduce=reduce).detach()
    return advantages, returns


def ppo_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    values: torch.Tensor,
    vpreds: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Clipped policy and value losses as masked token sums, to divide by the global token count:
    pg_sum, vf_sum (with its 0.5), loss_sum = pg_sum + vf_coef * vf_sum, tokens, and the sums behind the logged
    pg_clipfrac, vf_clipfrac and mean ratio (pg_clipped, vf_clipped, ratio_sum)."""
    mask = mask.to(logps.dtype)
    vpred_clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf1 = (vpreds - returns) ** 2
    vf2 = (vpred_clipped - returns) ** 2
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_sum = (torch.max(pg1, pg2) * mask).sum()
    vf_sum = 0.5 * (torch.max(vf1, vf2) * mask).sum()
    return {
        "pg_sum": pg_sum,
        "vf_sum": vf_sum,
        "loss_sum": pg_sum + vf_coef * vf_sum,
        "tokens": mask.sum().detach(),
        "pg_clipped": (torch.gt(pg2, pg1).to(mask.dtype) * mask).sum().detach(),
        "vf_clipped": (torch.gt(vf2, vf1).to(mask.dtype) * mask).sum().detach(),
        "ratio_sum": (ratio.detach() * mask).sum(),
    }


def ratio_skipped(ratio_sum: torch.Tensor | float, tokens: torch.Tensor | float, threshold: float = 10.0) -> bool:
    """Whether the mean ratio is above the threshold: TRL then zeroes the loss (the batch is too far off-policy)."""
    return float(ratio_sum) / max(float(tokens), 1.0) > threshold


# -- PPO: controllers ---------------------------------------------------------------------------------------------
class AdaptiveKL:
    """Adaptive KL coefficient (Ziegler et al. 2019): moves the coefficient toward a target KL, at most
    ±20% x n_steps / horizon per update."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """n_steps: examples in the update (TRL: batch_size x processes)."""
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The coefficient reached; target and horizon stay the config's (a resumed run may change ppo_target)."""
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std of the scores over all batches so far (TRL 0.9.6's, for use_score_scaling/norm)."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor, reduce: Reduce | None = None) -> tuple[float, float]:
        """Fold in a batch (the global one when `reduce` sums moments across ranks); returns its mean and
        unbiased std."""
        moments = masked_moments(xs, torch.ones_like(xs, dtype=torch.bool))
        if reduce is not None:
            moments = reduce(moments)
        total, squares, xs_count = moments.cpu().unbind()
        xs_mean = total / xs_count
        xs_var = (squares / xs_count - xs_mean * xs_mean).clamp(min=0.0)  # biased
        # float64 tensors, not floats: a batch of one divides by zero as TRL's tensors did (inf/nan, no raise)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        new_var = (old_sum + new_sum) / tot_count
        self.mean += (delta * xs_count / tot_count).item()
        self.std = (new_var * tot_count / (tot_count - 1)).sqrt().item()
        self.var = new_var.item()
        self.count = tot_count.item()
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).sqrt().item()

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """(scores - mean) / (std + eps): TRL's use_score_scaling with use_score_norm, both set by ppo_score_norm."""
        return (scores - self.mean) / (self.std + torch.finfo(torch.float32).eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
        self.var, self.count = float(state["var"]), float(state["count"])
