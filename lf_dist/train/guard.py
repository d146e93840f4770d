"""What stops a run on purpose: preemption (SIGTERM / SIGINT) and non-finite losses.

Preemption: the first signal sets a flag; the current optimizer step finishes; after every step the ranks agree
in one collective (a sum of the flags over the data-parallel group) so that all of them stop after the same
step, write one complete checkpoint and exit with EXIT_PREEMPTED. Later signals are ignored: the checkpoint is
written under a temporary name and renamed, so even a SIGKILL during the save leaves no half checkpoint.

Non-finite: a step whose loss or gradient norm is NaN / inf is skipped by the strategy where it can (the weights
stay as they were; fp16's loss scaler skips its own overflow steps and those do not count); after
`max_nonfinite_steps` such steps in a row, or at once where the strategy cannot skip (the weights may then be
poisoned), the run stops without saving.
"""

from __future__ import annotations

import math
import signal

from lf_dist.errors import EXIT_FAILED, EXIT_PREEMPTED, RunStopped
from lf_dist.log import get_logger
from lf_dist.signals import on_signals

logger = get_logger(__name__)


class RunGuard:
    def __init__(self, strategy, max_nonfinite_steps: int, loss_scaling: bool = False, stop_file=None):
        self.strategy, self.max_nonfinite, self.stop_file = strategy, max_nonfinite_steps, stop_file
        self.loss_scaling = loss_scaling  # fp16: an overflowing gradient is the scaler's business
        self.signal_name: str | None = None
        self.nonfinite_steps: list[int] = []
        self.poisoned = False  # a non-finite update reached the weights: never save them

    # -- signals ------------------------------------------------------------------------------------------
    def __enter__(self):
        self._signals = on_signals(self._on_signal)
        self._signals.__enter__()
        return self

    def __exit__(self, *exc):
        self._signals.__exit__(*exc)

    def _on_signal(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if self.strategy.is_main:
                logger.info(f"{self.signal_name}: finishing this step, then writing a checkpoint and stopping")

    def stop_requested(self) -> bool:
        """Whether any rank was signalled (one collective, every step, on every rank)."""
        asked = self.signal_name is not None
        if not asked and self.strategy.is_main and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = "a stop request"
            asked = True
        return self.strategy.all_reduce_sum(1 if asked else 0) > 0

    def preempted(self, step: int, checkpoint) -> RunStopped:
        where = f"checkpoint-{step} written to {checkpoint.parent}" if checkpoint else "no checkpoint written"
        return RunStopped(
            f"stopped by {self.signal_name or 'a signal on another rank'} after step {step}; preemption {where}; "
            "run the same command again to resume",
            EXIT_PREEMPTED,
            label="preempted",
        )

    # -- non-finite losses --------------------------------------------------------------------------------
    def check_finite(self, step: int, loss: float, grad_norm: float, last_good) -> None:
        """Count a non-finite step (loss or gradient norm); stop with one line when the limit is reached."""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or self.loss_scaling):
            self.nonfinite_steps = []
            return
        self.nonfinite_steps.append(step)
        skipped = self.strategy.skips_nonfinite_steps
        self.poisoned |= not skipped
        if skipped and len(self.nonfinite_steps) < self.max_nonfinite:
            if self.strategy.is_main:
                logger.info(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; the update was skipped")
            return
        steps = ", ".join(map(str, self.nonfinite_steps))
        good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before"
        raise RunStopped(
            f"non-finite loss or gradient norm (loss {loss}, grad norm {grad_norm}) at step(s) {steps}; stopped "
            f"without saving (max_nonfinite_steps: {self.max_nonfinite}); {good}; lower learning_rate or check "
            "the data",
            EXIT_FAILED,
        )
