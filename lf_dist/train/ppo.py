"""ppo and ppo_custom: LLaMA-Factory's PPO (TRL 0.9.6's formulas and constants) on the loop every stage shares.

A step is one rollout of per-device batch × accumulation × ppo_buffer_size prompts per rank: each prompt answered
once, scored (a reward model for ppo, reward functions for ppo_custom), optionally normalised by running score
moments, turned into per-token rewards with the adaptive KL penalty, and into advantages by GAE; then
ppo_epochs × ppo_buffer_size updates of the clipped policy and value losses. Statistics that span the batch
(score moments, reward and advantage whitening, the mean KL) are taken over every rank's rollout, so two ranks
compute what one process does (TRL 0.9.6 whitened per process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lf_dist.model.heads import find_module
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

GAMMA, LAM, CLIPRANGE, CLIPRANGE_VALUE, VF_COEF, RATIO_THRESHOLD = 1.0, 0.95, 0.2, 0.2, 0.1, 10.0
INIT_KL_COEF, KL_HORIZON = 0.2, 10000


class PPOLoss(StageLoss):
    def __init__(self, cfg, frozen: dict):
        f = cfg.finetuning
        self.epochs, self.buffer = f.ppo_epochs, f.ppo_buffer_size
        self.accum = cfg.train.gradient_accumulation_steps
        self.score_norm, self.whiten_rewards = f.ppo_score_norm, f.ppo_whiten_rewards
        self.kl = rl_losses.AdaptiveKL(INIT_KL_COEF, f.ppo_target, KL_HORIZON)
        self.moments = rl_losses.RunningMoments()
        self.sampling = sampling_of(cfg)
        self.funcs = load_reward_functions(f.reward_funcs or [])  # ppo_custom's default is filled by its check
        self.weights = torch.tensor(f.reward_weights or [1.0] * len(self.funcs), dtype=torch.float32)
        self.reward_model, self.reference = frozen.get("reward"), frozen["reference"]

    @staticmethod
    def num_units(batch: dict):
        return batch["units"]

    @staticmethod
    def num_input_tokens(batch: dict) -> int:
        return int(batch["n_tokens"])

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])

    def rollout_columns(self, model, batch: dict) -> dict:
        """The policy's log-probs and values of its rollout, and the reference's log-probs (no gradients)."""
        logps, _, _, values = completion_logps(model, batch, 1.0, find_module(model, "v_head"))
        with self.reference.use(model) as ref:
            ref_logps = completion_logps(ref, batch, 1.0)[0]
        return {"old_logps": logps, "old_values": values, "ref_logps": ref_logps}

    def scores(self, model, batch: dict) -> torch.Tensor:
        from lf_dist.train.reward_model import reward_scores

        last = (batch["labels"] != -100).long().cumsum(-1).argmax(-1)  # the last completion token of each row
        with self.reward_model.use(model) as rm:
            return reward_scores(rm, batch["input_ids"], last)

    def forward(self, model, batch: dict) -> dict:
        logps, entropy, mask, values = completion_logps(model, batch, 1.0, find_module(model, "v_head"))
        return {"logps": logps, "entropy": entropy, "mask": mask, "values": values}

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = outputs["mask"]
        rows = {k: as_rows(batch[k], mask) for k in ("old_logps", "old_values", "advantages", "returns")}
        logps, vpreds = as_rows(outputs["logps"], mask), as_rows(outputs["values"], mask)
        terms = rl_losses.ppo_losses(
            logps,
            rows["old_logps"],
            rows["old_values"],
            vpreds,
            rows["advantages"],
            rows["returns"],
            mask,
            CLIPRANGE,
            CLIPRANGE_VALUE,
            VF_COEF,
        )
        tokens = terms["tokens"]
        # TRL skips a mini-batch (our micro-batch) whose mean ratio is far off-policy
        keep = 0.0 if rl_losses.ratio_skipped(terms["ratio_sum"], tokens, RATIO_THRESHOLD) else 1.0
        ratio = torch.exp(logps - rows["old_logps"]).detach()
        clips = rl_losses.clip_fractions(ratio, rows["advantages"], mask.float(), CLIPRANGE, CLIPRANGE)
        metrics = {name: metric(s, c) for name, (s, c) in clips.items()}
        metrics.update(
            policy_loss=metric(terms["pg_sum"] * keep, tokens),
            value_loss=metric(terms["vf_sum"] * keep, tokens),
            entropy=metric(outputs["entropy"], tokens),
            **{"clip_ratio/value_mean": metric(terms["vf_clipped"], tokens)},
            skipped_batches=metric(torch.tensor(1.0 - keep), 1),
        )
        return terms["loss_sum"] * keep, metrics


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several micro-batches [b_i, T_i] as one [Σ b_i, max T_i], zero-padded on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])


def _flat(rows: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """`_stack`ed rows back to each micro-batch's flat per-token values (row-major over its mask)."""
    out, start = [], 0
    for m in masks:
        out.append(rows[start : start + m.shape[0], : m.shape[1]][m])
        start += m.shape[0]
    return out


def _scores(ctx, loss: PPOLoss, rollouts, batches: list[dict]) -> torch.Tensor:
    if loss.reward_model is not None:
        return torch.cat([ctx.strategy.forward_only(ctx.model, b, loss.scores).float().cpu() for b in batches])
    per_func = score_with_functions(ctx, rollouts, loss.funcs)
    return torch.nan_to_num(torch.cat([rl_losses.weighted_rewards(p, loss.weights) for p in per_func]), nan=0.0)


def ppo_prepare(ctx, batches: list[dict]) -> list[list[dict]]:
    """Generate, score, take log-probs, values and advantages → ppo_epochs × ppo_buffer_size updates."""
    loss: PPOLoss = ctx.loss
    strategy = ctx.strategy
    clock = Clock(ctx)
    rollouts = generate(ctx, batches, 1, loss.sampling)
    clock.lap("generating")
    mbs = [dict(r.batch) for r in rollouts]
    raw = _scores(ctx, loss, rollouts, mbs)
    clock.lap("scoring")
    record(ctx, rollouts, batches, list(raw.split([len(r.texts) for r in rollouts])))
    mean, std, n = global_moments(ctx, raw)
    log_value(ctx, "reward", mean)
    log_value(ctx, "reward_std", std)
    scores = raw
    if loss.score_norm:
        loss.moments.update(raw, strategy.all_reduce_sum)
        scores = loss.moments.normalize(raw)
    for mb in mbs:
        mb.update({k: v.cpu() for k, v in strategy.forward_only(ctx.model, mb, loss.rollout_columns).items()})
    masks = [mb["labels"][:, 1:] != -100 for mb in mbs]
    logps = _stack([as_rows(mb["old_logps"], m) for mb, m in zip(mbs, masks)])
    ref = _stack([as_rows(mb["ref_logps"], m) for mb, m in zip(mbs, masks)])
    values = _stack([as_rows(mb["old_values"], m) for mb, m in zip(mbs, masks)])
    mask = _stack([m.float() for m in masks]).bool()
    rewards, kl = rl_losses.kl_penalized_rewards(scores, logps, ref, mask, loss.kl.value)
    advantages, returns = rl_losses.gae(
        rewards, values, mask, GAMMA, LAM, loss.whiten_rewards, strategy.all_reduce_sum
    )
    mean_kl, _, _ = global_moments(ctx, kl.sum(-1))
    log_value(ctx, "kl", mean_kl)
    log_value(ctx, "kl_coef", loss.kl.value)
    loss.kl.update(mean_kl, n)  # TRL: after the step, with the global batch size
    log_lengths(ctx, rollouts)
    for mb, m, adv, ret, r in zip(mbs, masks, _flat(advantages, masks), _flat(returns, masks), rollouts):
        mb.update(
            advantages=adv,
            returns=ret,
            units=float(m.sum()),
            n_tokens=int((r.completions.prompt_mask.sum(-1) + r.completions.lengths).sum()),
        )
        del mb["ref_logps"]
    clock.lap("reference")
    slots = [mbs[i * loss.accum : (i + 1) * loss.accum] for i in range(loss.buffer)]
    updates = []
    for epoch in range(loss.epochs):  # the buffer's slots in an order keyed by seed, step and epoch
        g = torch.Generator().manual_seed(hash((ctx.seed, ctx.step, epoch)) & 0x7FFFFFFF)
        updates += [slots[i] for i in torch.randperm(loss.buffer, generator=g).tolist()]
    return updates
