"""One step's micro-batches through megatron-core's schedules (`get_forward_backward_func`).

The schedule calls the forward on every pipeline stage and the stage's loss on the last one. The loss is the
stage's own (`stage_loss.loss`), handed the label tokens' log-probs that the model computes with megatron-core's
vocab-parallel cross-entropy, so the logits of a tensor-parallel output layer are never gathered. Each
micro-batch's loss is a sum; with `calculate_per_token_loss` megatron-core's `finalize_model_grads` divides the
gradients by the step's global count of label tokens, as every other backend normalises its loss.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # data/tokenize.py's: parallel/ does not import data/


class LabelLogps(NamedTuple):
    """The label tokens' log-probs as the stages' losses read them (train/token_logps.py's TokenLogps)."""

    values: torch.Tensor  # log p(label) at each scored position, fp32, row-major order [N]
    mask: torch.Tensor  # [B, T-1]: which positions t (scoring label t+1) are in `values`


def pad_micro_batches(micro_batches: list[dict], multiple: int = 1) -> tuple[list[dict], int, int]:
    """Right-pad every micro-batch of a step to one shape (pipeline stages exchange fixed-size activations):
    rows to the largest batch (rows of padding with no labels), tokens to the longest row, rounded up to
    `multiple` (sequence parallelism splits the sequence over the tensor-parallel ranks)."""
    rows = max(b["input_ids"].shape[0] for b in micro_batches)
    length = max(b["input_ids"].shape[1] for b in micro_batches)
    length = -(-length // multiple) * multiple
    padded = []
    for b in micro_batches:
        ids, labels = b["input_ids"], b["labels"]
        extra_rows, extra_len = rows - ids.shape[0], length - ids.shape[1]
        padded.append(
            {
                "input_ids": F.pad(ids, (0, extra_len, 0, extra_rows), value=0),
                "labels": F.pad(labels, (0, extra_len, 0, extra_rows), value=IGNORE_INDEX),
            }
        )
    return padded, rows, length


def model_batch(batch: dict, device: torch.device) -> dict:
    """What the GPT model reads: ids, positions 0..T-1 (rows are right-padded: causal attention never lets a token
    see the padding after it, so no mask is needed), and each position's next label (0 where none is scored; the
    mask leaves those out)."""
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    mask = labels[:, 1:] != IGNORE_INDEX
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    targets = targets.masked_fill(targets == IGNORE_INDEX, 0)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    return {"input_ids": ids, "position_ids": positions, "targets": targets, "mask": mask, "labels": labels}


def label_ce(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-token cross-entropy of vocab-parallel logits [B, T, V/tp] (megatron-core's, never gathered); the rows
    that pad the vocabulary to a multiple of the tensor-parallel size are masked out of the softmax."""
    from megatron.core import parallel_state, tensor_parallel

    logits = logits.float()
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    if start + logits.shape[-1] > vocab:
        logits = logits.clone()
        logits[..., max(vocab - start, 0) :] = float("-inf")
    return tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


def _forward_step(stage_loss, device, vocab, data_iterator, model):
    batch = model_batch(next(data_iterator), device)
    output = model(batch["input_ids"], batch["position_ids"], None)
    return output, partial(_loss, stage_loss, batch, vocab)


def _loss(stage_loss, batch: dict, vocab: int, logits: torch.Tensor):
    """On the last pipeline stage: the stage's summed loss, its label-token count, and what is reported."""
    per_token_ce = label_ce(logits, batch["targets"], vocab)
    logps = LabelLogps(-per_token_ce[:, :-1][batch["mask"]], batch["mask"])
    loss, metrics = stage_loss.loss(logps, {"labels": batch["labels"], "input_ids": batch["input_ids"]})
    if metrics:
        raise NotImplementedError("strategy megatron reports the loss only; this stage logs metrics")
    count = torch.tensor(int(batch["mask"].sum()), dtype=torch.int, device=loss.device)
    return loss, count, {"loss_sum": loss.detach().clone()}


def run_schedule(chunks: list, micro_batches: list[dict], stage_loss, device, vocab: int, multiple: int = 1):
    """The step's micro-batches through the schedule, forward and backward; returns the summed loss, on every
    pipeline stage. `vocab` is the model's own vocabulary size (the output layer's may be padded)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    padded, rows, length = pad_micro_batches(micro_batches, multiple)
    iterators = [iter(padded) for _ in chunks]  # each virtual stage draws the same micro-batches
    forward_backward = get_forward_backward_func()
    reported = forward_backward(
        forward_step_func=partial(_forward_step, stage_loss, device, vocab),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(padded),
        seq_length=length,
        micro_batch_size=rows,
        forward_only=False,
    )
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for item in reported or []:
        loss_sum += item["loss_sum"].float()
    return broadcast_from_last_stage(loss_sum)


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor the last pipeline stage holds, on every stage of its pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    group = parallel_state.get_pipeline_model_parallel_group()
    torch.distributed.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return tensor


def label_logps(chunks: list, batch: dict, device, vocab: int) -> LabelLogps:
    """The label tokens' log-probs of one batch without gradients (evaluation), on every pipeline stage. The
    interleaved schedule takes at least one micro-batch per pipeline stage: there the rows are split into that
    many (padded with rows that score nothing)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    prepared = model_batch(batch, device)
    splits = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    rows = -(-batch["input_ids"].shape[0] // splits)
    parts, _, length = pad_micro_batches(
        [{k: batch[k][i * rows : (i + 1) * rows] for k in ("input_ids", "labels")} for i in range(splits)]
    )
    pieces = []

    def keep(part, logits):
        per_token_ce = label_ce(logits, part["targets"], vocab)
        pieces.append(-per_token_ce[:, :-1][part["mask"]])
        return per_token_ce.sum(), {}

    def forward_step(data_iterator, model):
        part = model_batch(next(data_iterator), device)
        return model(part["input_ids"], part["position_ids"], None), partial(keep, part)

    iterators = [iter(parts) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=splits,
        seq_length=length,
        micro_batch_size=rows,
        forward_only=True,
    )
    values = torch.cat(pieces) if pieces else torch.zeros(int(prepared["mask"].sum()), device=device)
    return LabelLogps(broadcast_from_last_stage(values.float().contiguous()), prepared["mask"])
