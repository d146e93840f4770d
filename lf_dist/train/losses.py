"""What the loop needs from a stage's loss, a handle on frozen models, and the causal-LM loss of pt and sft.

A stage's loss is two steps: `forward(model, batch) -> outputs` runs the model(s), `loss(outputs, batch)`
turns outputs into the loss; the strategy calls both (training and evaluation alike), so a schedule can sit
between them. Work before the update (reference log-probs, rollouts) is the stage's `prepare` hook, which adds
batch columns (`StageSpec.prepare`).

Losses are returned as *sums* over the stage's units — label tokens for pt/sft, pairs for rm/dpo, examples for
kto; the loop divides by the number of units in the whole optimizer step (all micro-batches, all data-parallel
ranks), so batch layout never changes the gradient. Metrics come back as (sum, count) tensors; the loop
reduces them and `summarize` turns them into the logged means. A loss knows nothing of backends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from lf_dist.data.tokenize import IGNORE_INDEX
from lf_dist.train.token_logps import label_logps, sequence_logps


def model_inputs(batch: dict) -> dict:
    """What the model sees, by the batch's layout (`data/collator.py`):

    - examples kept apart (`cu_seq_lens`): no mask, restarting positions and the segment boundaries, which
      varlen attention (and flash-attention) reads; sdpa and eager build a block-diagonal mask from the
      positions instead;
    - packed rows whose examples see each other (LLaMA-Factory's plain `packing`): restarting positions and
      an all-ones mask, so attention is plain causal (no 4-D mask is built);
    - right-padded rows: the ids alone. Causal attention never lets a real token see the padding after it,
      so the padding mask changes nothing the loss reads and would only cost a 4-D mask.
    """
    if "cu_seq_lens" in batch:
        cu, longest = batch["cu_seq_lens"], int(batch["max_seq_len"])
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    if "position_ids" in batch:
        ids = batch["input_ids"]
        return {"input_ids": ids, "position_ids": batch["position_ids"], "attention_mask": torch.ones_like(ids)}
    return {"input_ids": batch["input_ids"]}


def metric(total: torch.Tensor, count) -> torch.Tensor:
    """A (sum, count) pair, detached, in float64 so sums over many steps stay exact enough."""
    count = count if torch.is_tensor(count) else torch.tensor(float(count), device=total.device)
    return torch.stack([total.detach().double().sum(), count.double().to(total.device)])


class StageLoss:
    """The loss of a stage, as the loop calls it."""

    @staticmethod
    def num_units(batch: dict) -> int:
        """What the loss is summed over (the step's loss is divided by the global count)."""
        raise NotImplementedError

    @staticmethod
    def num_input_tokens(batch: dict) -> int:
        """Real (non-padding) tokens the model reads, for throughput."""
        if "seq_ids" in batch:
            return int((batch["seq_ids"] >= 0).sum())
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def forward(self, model, batch: dict):
        """Run the model on one micro-batch: the outputs `loss` reads (log-probs, scores), with gradients."""
        raise NotImplementedError

    def loss(self, outputs, batch: dict) -> tuple[torch.Tensor, dict]:
        """(summed loss, metrics as (sum, count) pairs) of one micro-batch, from its outputs."""
        raise NotImplementedError

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """forward then loss, in one call (tests, benchmarks: no strategy in between)."""
        return self.loss(self.forward(model, batch), batch)

    def means(self, sums: dict) -> dict:
        """Means from reduced (sum, count) pairs; metrics without any count this window are left out."""
        return {k: float(v[0] / v[1]) for k, v in sums.items() if float(v[1]) > 0}

    def summarize(self, sums: dict) -> dict:
        """The logged values of reduced (sum, count) pairs."""
        return {k: round(v, 6) for k, v in self.means(sums).items()}

    def state_dict(self) -> dict:
        """What the loss carries from step to step (ppo's KL coefficient, score moments), JSON-serialisable: it
        is saved in checkpoints and restored on resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - most losses carry nothing
        pass


@dataclass
class StepContext:
    """What a stage's `prepare` works with: the strategy (`forward_only`, `generate`), the policy as the
    strategy wrapped it, the stage's loss (its frozen models) and the tokenizer; for rollouts also the token ids
    that end an answer, the 0-based step being prepared and the run's seed. `metrics` collects the (sum, count)
    pairs `prepare` measures (rewards, lengths, seconds), which the loop logs with the step's."""

    strategy: object
    model: torch.nn.Module
    loss: StageLoss
    tokenizer: object = None
    stop_ids: list[int] | None = None
    step: int = 0
    seed: int = 0
    metrics: dict = field(default_factory=dict)
    completions_file: object = None  # a Path: rollouts are recorded there by the main rank (`log_completions`)
    # this rank's running totals for all_results.json: generated tokens and seconds spent generating, updating
    totals: dict = field(default_factory=dict)


def one_step(ctx: StepContext, batches: list[dict]) -> list[list[dict]]:
    """The default `prepare`: the loader's micro-batches are one optimizer step, as they are."""
    return [batches]


class Frozen:
    """A model a stage reads but never trains: a frozen copy placed like the policy by the strategy, or —
    `model` None — the policy itself with its LoRA adapters disabled (no second copy in memory)."""

    def __init__(self, model=None, unwrap=None):
        self.model, self.unwrap = model, unwrap

    def use(self, policy):
        """A context giving the module to call."""
        if self.model is not None:
            return contextlib.nullcontext(self.model)
        return _adapters_off(self.unwrap(policy) if self.unwrap else policy, policy)

    @torch.no_grad()
    def logps(self, policy, inputs: dict, labels, seq_ids, n_seqs: int) -> torch.Tensor:
        """Summed label log-probs per sequence under this model (once per batch, without gradients)."""
        with self.use(policy) as model:
            return sequence_logps(model, inputs, labels, seq_ids, n_seqs)[0]


@contextlib.contextmanager
def _adapters_off(inner, policy):
    with inner.disable_adapter():
        yield policy


class CausalLMLoss(StageLoss):
    """pt and sft: next-token cross-entropy on the label tokens."""

    @staticmethod
    def num_units(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(self, model, batch: dict):
        return label_logps(model, model_inputs(batch), batch["labels"])

    def loss(self, outputs, batch: dict) -> tuple[torch.Tensor, dict]:
        return -outputs.values.sum(), {}
