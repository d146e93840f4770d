"""Which examples each optimizer step sees: a pure function of (seed, epoch, step), so resume is exact.

Each epoch is a seeded permutation of the dataset, split across ranks (rank r takes every world-th index,
padded by wrapping so all ranks run the same number of micro-batches) and cut into micro-batches; an optimizer
step takes `accum` consecutive micro-batches (the last step of an epoch may take fewer).
"""

from __future__ import annotations

import math

import torch


def resolve_steps(value: float | None, total_steps: int) -> int | None:
    """HF semantics: a value below 1 is a fraction of the total steps."""
    if value is None or value <= 0:
        return None
    return max(1, math.ceil(value * total_steps)) if value < 1 else int(value)


class StepSchedule:
    def __init__(self, num_examples: int, batch_size: int, accum: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.accum, self.seed = num_examples, batch_size, accum, seed
        self.rank, self.world = rank, world
        self.per_rank = math.ceil(num_examples / world)
        self.batches_per_epoch = math.ceil(self.per_rank / batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self._cache: tuple[int, list] | None = None

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        return max_steps if max_steps > 0 else max(1, math.ceil(num_train_epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            perm += perm[: self.per_rank * self.world - self.n]  # equal share per rank
            mine = perm[self.rank :: self.world]
            self._cache = (epoch, [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)])
        return self._cache[1]

    def epoch_of(self, global_step: int) -> int:
        return global_step // self.steps_per_epoch

    def step(self, global_step: int) -> list[list[int]]:
        """The micro-batches (lists of example indices) of 0-based optimizer step `global_step`."""
        epoch, j = divmod(global_step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[j * self.accum : (j + 1) * self.accum]
