"""grpo: group-relative policy optimisation with TRL GRPOConfig's names, defaults and formulas.

Each prompt is answered `num_generations` times on the rank that holds it; the completions are scored by the
reward functions, and each one's advantage is its reward against its group's (scaled by the group's or the
global batch's std). The update is the clipped surrogate of `rl_losses.grpo_token_loss`, plus `beta` times the
k3 KL to the reference, reduced as `loss_type` says over the whole step's completions (every rank's): one
process and any number of ranks compute the same update. A step is one rollout and `num_iterations` updates.
"""

from __future__ import annotations

import torch

from lf_dist.parallel.base import add_metrics
from lf_dist.train import rl_losses
from lf_dist.train.losses import StageLoss, metric
from lf_dist.train.online_rl import (
    Clock,
    as_rows,
    completion_logps,
    generate,
    global_moments,
    log_lengths,
    log_value,
    record,
    sampling_of,
    score_with_functions,
)
from lf_dist.train.rewards import load_reward_functions

# TRL's sampling defaults where the config leaves the generation keys unset
GRPO_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 512}


class GRPOLoss(StageLoss):
    def __init__(self, cfg, frozen: dict):
        f = cfg.finetuning
        self.num_generations, self.beta, self.loss_type = f.num_generations, f.beta, f.loss_type
        self.epsilon_low, self.epsilon_high = f.epsilon, f.epsilon_high if f.epsilon_high is not None else f.epsilon
        self.scale_rewards, self.iterations = f.scale_rewards, f.num_iterations
        self.mask_truncated, self.bias_correction_kl = f.mask_truncated_completions, f.use_bias_correction_kl
        self.sampling = sampling_of(cfg, GRPO_SAMPLING)
        self.funcs = load_reward_functions(f.reward_funcs or [])
        self.weights = torch.tensor(f.reward_weights or [1.0] * len(self.funcs), dtype=torch.float32)
        self.reference = frozen.get("reference")

    @staticmethod
    def num_units(batch: dict):
        return batch["units"]

    @staticmethod
    def num_input_tokens(batch: dict) -> int:
        return int(batch["n_tokens"])

    def _logps(self, model, batch: dict) -> torch.Tensor:
        return completion_logps(model, batch, self.sampling.temperature)[0]

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        with self.reference.use(model) as ref:
            return self._logps(ref, batch)

    def forward(self, model, batch: dict) -> dict:
        logps, entropy, mask, _ = completion_logps(model, batch, self.sampling.temperature)
        return {"logps": logps, "entropy": entropy, "mask": mask}

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = outputs["mask"]
        logps = as_rows(outputs["logps"], mask)
        old = as_rows(batch["old_logps"], mask) if "old_logps" in batch else logps.detach()
        ref = as_rows(batch["ref_logps"], mask) if self.beta != 0.0 else None
        token_mask = mask.float() * batch["keep"][:, None]
        advantages = batch["advantages"]
        per_token, kl, ratio = rl_losses.grpo_token_loss(
            logps, old, ref, advantages, self.beta, self.epsilon_low, self.epsilon_high, self.bias_correction_kl
        )
        max_len = self.sampling.max_new_tokens
        total, units = rl_losses.grpo_reduce(per_token, token_mask, self.loss_type, max_len)
        policy = per_token - self.beta * kl if kl is not None else per_token
        policy_total, _ = rl_losses.grpo_reduce(policy, token_mask, self.loss_type, max_len)
        n_tokens = token_mask.sum()
        metrics = {
            "policy_loss": metric(policy_total, units),
            "entropy": metric(as_rows(outputs["entropy"], mask) * token_mask, n_tokens),
        }
        if kl is not None:
            metrics["kl"] = metric(kl * token_mask, n_tokens)
        for name, (s, c) in rl_losses.clip_fractions(
            ratio, advantages, token_mask, self.epsilon_low, self.epsilon_high
        ).items():
            metrics[name] = metric(s, c)
        return total, metrics


def _advantages(ctx, loss: GRPOLoss, rewards: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each rollout's advantages; groups are whole on their rank, and "batch" scaling takes the global std."""
    if loss.scale_rewards != "batch":
        pairs = [rl_losses.group_advantages(r, loss.num_generations, loss.scale_rewards) for r in rewards]
        return [a for a, _ in pairs], torch.cat([s for _, s in pairs])
    _, std, n = global_moments(ctx, torch.cat(rewards))
    std = std if n > 1 else 0.0
    out = []
    for r in rewards:
        grouped = r.view(-1, loss.num_generations)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(loss.num_generations)
        out.append(torch.nan_to_num((r - mean) / (std + 1e-4), nan=0.0))
    return out, torch.full((sum(len(r) for r in rewards),), std)


def grpo_prepare(ctx, batches: list[dict]) -> list[list[dict]]:
    """Generate, score, take advantages (and reference / old log-probs) → `num_iterations` updates."""
    loss: GRPOLoss = ctx.loss
    clock = Clock(ctx)
    rollouts = generate(ctx, batches, loss.num_generations, loss.sampling)
    clock.lap("generating")
    per_func = score_with_functions(ctx, rollouts, loss.funcs)
    rewards = [rl_losses.weighted_rewards(p, loss.weights) for p in per_func]
    advantages, std = _advantages(ctx, loss, rewards)
    clock.lap("scoring")
    _log_rewards(ctx, loss, per_func, rewards, std)
    record(ctx, rollouts, batches, rewards)
    log_lengths(ctx, rollouts)
    out = []
    for r, adv in zip(rollouts, advantages):
        keep = (~r.completions.truncated).float() if loss.mask_truncated else torch.ones(len(adv))
        lengths = r.completions.lengths
        token_mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float() * keep[:, None]
        max_len = loss.sampling.max_new_tokens
        _, units = rl_losses.grpo_reduce(torch.zeros_like(token_mask), token_mask, loss.loss_type, max_len)
        units = float(units)
        n_tokens = int((r.completions.prompt_mask.sum(-1) + lengths).sum())
        batch = {**r.batch, "advantages": adv, "keep": keep, "units": units, "n_tokens": n_tokens}
        if loss.beta != 0.0:
            batch["ref_logps"] = ctx.strategy.forward_only(ctx.model, batch, loss.reference_logps)
        if loss.iterations > 1:  # the rollout's own log-probs, which later iterations' ratios are taken against
            batch["old_logps"] = ctx.strategy.forward_only(ctx.model, batch, loss._logps)
        out.append(batch)
    if loss.beta != 0.0 or loss.iterations > 1:
        clock.lap("reference")
    return [out] * loss.iterations


def _log_rewards(ctx, loss: GRPOLoss, per_func: list[torch.Tensor], rewards: list[torch.Tensor], std) -> None:
    mean, spread, _ = global_moments(ctx, torch.cat(rewards))
    log_value(ctx, "reward", mean)
    log_value(ctx, "reward_std", spread)
    columns = torch.cat(per_func)
    for i, func in enumerate(loss.funcs):
        func_mean, func_std, _ = global_moments(ctx, columns[:, i])
        log_value(ctx, f"rewards/{func.name}/mean", func_mean)
        log_value(ctx, f"rewards/{func.name}/std", func_std)
    zero = torch.isclose(std, torch.zeros_like(std)).double()
    add_metrics(ctx.metrics, {"frac_reward_zero_std": metric(zero.sum(), len(zero))})
