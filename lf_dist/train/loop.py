"""The training loop, shared by every backend: the stage prepares each step's micro-batches (`prepare`), the
strategy runs them (the stage's forward and loss, then backward), steps the optimizer and saves.

A step is one draw of the loader. Most stages make one optimizer update of it; a rollout stage's `prepare` may
turn it into several (ppo's epochs over its buffer, grpo's iterations), and steps, logs, saves and the learning
rate schedule still count steps."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lf_dist.errors import RunStopped
from lf_dist.parallel.base import add_metrics
from lf_dist.signals import STOP_FILE
from lf_dist.train import checkpoint as ckpt
from lf_dist.train import faults, run_metrics
from lf_dist.train.guard import RunGuard
from lf_dist.train.losses import StepContext
from lf_dist.train.online_rl import drop_records_after
from lf_dist.train.optim import build_scheduler
from lf_dist.train.reporters import open_reporters
from lf_dist.train.schedule import StepSchedule, resolve_steps
from lf_dist.train.tracker import Tracker


class Trainer:
    """`stage` is the StageSpec (collator, prepare), `loss` its StageLoss built for this run; `model` and
    `optimizer` as the strategy set them up; `planned_peak_gb` is the plan's peak-memory estimate, logged next to
    the measured peak; checkpoints go to `checkpoint_dir` (default output_dir), and `report(metrics, path)`
    hears of each (a launcher's hook)."""

    def __init__(
        self,
        cfg,
        strategy,
        stage,
        loss,
        model,
        optimizer,
        tokenizer,
        datasets,
        planned_peak_gb=None,
        checkpoint_dir=None,
        report=None,
    ):
        self.cfg, self.args = cfg, cfg.train
        self.strategy, self.stage, self.loss, self.tokenizer = strategy, stage, loss, tokenizer
        data_args = cfg.data
        self.collator = stage.data.make_collator(
            tokenizer, data_args.cutoff_len, data_args.neat_packing, bool(data_args.padding_free)
        )
        self.train_ds, self.eval_ds = datasets.train, datasets.eval
        self.output_dir = Path(self.args.output_dir)
        self.checkpoint_dir = Path(checkpoint_dir or self.output_dir)
        self.planned_peak_gb, self.report = planned_peak_gb, report
        self.model, self.optimizer = model, optimizer
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.context = StepContext(strategy, model, loss, tokenizer, seed=self.args.seed)
        if cfg.finetuning.log_completions:
            self.context.completions_file = self.output_dir / "completions.jsonl"
        self.memory_after_setup_gb = round(strategy.memory_allocated() / 2**30, 3)  # weights, before any step
        batch_size, accum = stage.loader_shape(cfg)
        self.schedule = StepSchedule(
            len(self.train_ds),
            batch_size,
            accum,
            seed,
            strategy.dp_rank,
            strategy.dp_size,
        )
        self.total_steps = self.schedule.total_steps(self.args.num_train_epochs, self.args.max_steps)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.log_every = resolve_steps(self.args.logging_steps, self.total_steps)
        self.save_every = (
            resolve_steps(self.args.save_steps, self.total_steps) if self.args.save_strategy == "steps" else None
        )
        eval_steps = self.args.eval_steps if self.args.eval_steps is not None else self.args.logging_steps
        self.eval_every = resolve_steps(eval_steps, self.total_steps) if self.args.eval_strategy == "steps" else None
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.padded_tokens = 0  # batch slots processed, padding included (for the padding share)
        self.faults = faults.from_env()  # None unless a test arms one

    # -- one step ------------------------------------------------------------------------------------
    def train_step(self, updates: list[list[dict]]) -> tuple[float, float, int, dict]:
        """Each update: forward/backward of its micro-batches, normalized by its global unit count (label tokens,
        pairs, examples or completions, as the stage says), then an optimizer step; the learning rate moves once.
        Returns the mean loss and grad norm of the updates, input tokens and metric sums (with `prepare`'s)."""
        losses, norms, n_input, metrics = [], [], 0, self.context.metrics
        self.context.metrics, start = {}, time.perf_counter()
        for micro_batches in updates:
            n_units = self.strategy.all_reduce_sum(sum(self.loss.num_units(b) for b in micro_batches))
            self.model.train()
            loss_sum, update_metrics = self.strategy.forward_backward(self.model, micro_batches, self.loss, n_units)
            norms.append(self.strategy.step(self.model, self.optimizer, self.args.max_grad_norm))
            add_metrics(metrics, update_metrics)
            losses.append(float(self.strategy.all_reduce_sum(loss_sum)) / max(n_units, 1))
            n_input += int(self.strategy.all_reduce_sum(sum(self.loss.num_input_tokens(b) for b in micro_batches)))
            self.padded_tokens += int(self.strategy.all_reduce_sum(sum(b["input_ids"].numel() for b in micro_batches)))
        self.scheduler.step()
        if any(k.startswith("time/") for k in metrics):  # a rollout stage: its update's share of the step too
            seconds = time.perf_counter() - start
            add_metrics(
                metrics, {"time/updating": torch.stack([torch.tensor(seconds).double(), torch.tensor(1.0).double()])}
            )
            totals = self.context.totals
            totals["updating_s"] = totals.get("updating_s", 0.0) + seconds
            totals["update_tokens"] = totals.get("update_tokens", 0) + n_input
        return sum(losses) / len(losses), sum(norms) / len(norms), n_input, self._reduce(metrics)

    def _reduce(self, metrics: dict) -> dict:
        """(sum, count) pairs summed over the data-parallel ranks in one collective (every rank has the same keys)."""
        if not metrics:
            return {}
        keys = sorted(metrics)
        # the stage's metrics are on the device, `prepare`'s (rewards, lengths, seconds) on the CPU
        total = self.strategy.all_reduce_sum(torch.stack([metrics[k].to(self.strategy.device) for k in keys]))
        return {k: total[i].cpu() for i, k in enumerate(keys)}

    # -- data -----------------------------------------------------------------------------------------
    def _loader(self, start_step: int):
        """Micro-batches from `start_step` on, grouped per step (the schedule is deterministic); each carries its
        examples' dataset indices (`index`), which key a rollout's random draws."""
        steps = [self.schedule.step(s) for s in range(start_step, self.total_steps)]
        flat = [mb for step in steps for mb in step]
        # Its own generator: creating the iterator must not draw from the global RNG (dropout), or a resumed
        # run would see different random numbers than the uninterrupted one.
        loader = DataLoader(
            self.train_ds,
            batch_sampler=flat,
            collate_fn=self.collator,
            num_workers=self.args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(0),
        )
        it = iter(loader)
        for step in steps:
            yield [{**next(it), "index": torch.as_tensor(rows)} for rows in step]

    def _steps(self, start_step: int):
        """The steps from `start_step` on, each the updates the stage's `prepare` makes of its micro-batches."""
        for step, micro_batches in enumerate(self._loader(start_step), start=start_step):
            self.model.train()
            self.context.step = step
            yield self.stage.prepare(self.context, micro_batches)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict]:
        """Eval loss per unit, and the stage's metrics. Every rank runs the same number of batches (sharded
        models need all ranks in every forward)."""
        self.model.eval()
        bs, rank, world = self.args.per_device_eval_batch_size, self.strategy.dp_rank, self.strategy.dp_size
        per_rank = -(-len(self.eval_ds) // world)
        idx = list(range(rank, len(self.eval_ds), world))
        idx += [-1] * (per_rank - len(idx))
        total = torch.zeros((), device=self.strategy.device, dtype=torch.float64)
        units, metrics = 0, {}
        for i in range(0, len(idx), bs):
            real = [j for j in idx[i : i + bs] if j >= 0]
            weight = 1 if real else 0  # a rank with nothing left runs one example and discards it
            rows = [self.eval_ds[j] for j in real or [0]]
            for step in self.stage.prepare(self.context, [self.strategy.to_device(self.collator(rows))]):
                for batch in step:
                    outputs = self.strategy.forward_only(self.model, batch, self.loss.forward)
                    with self.strategy.autocast():  # as in training
                        loss, batch_metrics = self.loss.loss(outputs, batch)
                    total += weight * loss.double()
                    units += weight * self.loss.num_units(batch)
                    add_metrics(metrics, {k: v * weight for k, v in batch_metrics.items()})
        loss = float(self.strategy.all_reduce_sum(total)) / max(self.strategy.all_reduce_sum(units), 1)
        return loss, self.loss.summarize(self._reduce(metrics))

    def eval_results(self) -> dict:
        loss, metrics = self.evaluate()
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}}

    # -- the run --------------------------------------------------------------------------------------
    def _state(self, tracker: Tracker) -> dict:
        epoch, micro = divmod(self.step * self.args.gradient_accumulation_steps, self.schedule.batches_per_epoch)
        return {
            "global_step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.step / self.schedule.steps_per_epoch,
            "data_position": {"epoch": epoch, "micro_batch": micro},
            "num_tokens": tracker.num_tokens,
            "log_history": tracker.history,
            **({"stage_state": self.loss.state_dict()} if self.loss.state_dict() else {}),
        }

    def _log_eval_save(self, tracker: Tracker, loss: float, grad_norm: float, n_tokens: int, metrics: dict):
        epoch = self.step / self.schedule.steps_per_epoch
        epoch_end = self.step % self.schedule.steps_per_epoch == 0
        log_now = self._log_now(epoch_end)
        lr = self.scheduler.get_last_lr()[0]
        extra = run_metrics.memory_log(self.strategy, self.planned_peak_gb) if log_now else None
        tracker.on_step(self.step, loss, n_tokens, lr, grad_norm, epoch, log_now, extra, metrics)
        if self.eval_ds is not None and (
            (self.eval_every and self.step % self.eval_every == 0)
            or (self.args.eval_strategy == "epoch" and epoch_end)
        ):
            tracker.on_eval(self.step, self.eval_results(), epoch)
        if (
            (self.save_every and self.step % self.save_every == 0)
            or (self.args.save_strategy == "epoch" and epoch_end)
        ) and self.step < self.total_steps:
            self._save(tracker)

    def _save(self, tracker: Tracker, reason: str | None = None) -> Path:
        """A checkpoint of this step; `reason` ("preemption") marks one written outside save_steps, always with
        the full state to resume from."""
        state = {**self._state(tracker), **({"reason": reason} if reason else {})}
        path = ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self.strategy,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            state,
            self.args.save_only_model and reason is None,
            self.args.save_total_limit,
        )
        self.last_checkpoint = path
        if self.report is not None:
            self.report(
                {"step": self.step, "loss": tracker.history[-1].get("loss") if tracker.history else None}, path
            )
        return path

    def _samples_per_step(self) -> int:
        """Examples the loader draws per step (a rollout stage's prompts), over every rank."""
        return self.schedule.batch_size * self.schedule.accum * self.strategy.dp_size

    def _log_now(self, epoch_end: bool) -> bool:
        how = self.args.logging_strategy
        if how == "no":
            return False
        if self.step == self.total_steps or (self.args.logging_first_step and self.step == 1):
            return True
        return epoch_end if how == "epoch" else self.step % self.log_every == 0

    def _follow_learning_rate(self) -> None:
        """A resumed run with another learning_rate follows it from here (the scheduler's saved state carries
        the old peak); an unchanged one is left exactly as loaded. A group with an `lr_scale` (LoRA+'s B
        matrices) keeps its multiple of the learning rate."""
        groups = self.optimizer.param_groups
        peaks = [self.args.learning_rate * group.get("lr_scale", 1.0) for group in groups]
        if all(math.isclose(base, peak, rel_tol=1e-9) for base, peak in zip(self.scheduler.base_lrs, peaks)):
            return
        self.scheduler.base_lrs = peaks
        for group, factor, peak in zip(groups, self.scheduler.lr_lambdas, peaks):
            group["initial_lr"], group["lr"] = peak, peak * factor(self.scheduler.last_epoch)

    def _resume(self, resume_from: Path | None) -> dict | None:
        """Load the checkpoint to go on from (weights, optimizer, scheduler, RNG); its trainer state."""
        if resume_from is None:
            return None
        state = ckpt.load_state(resume_from)
        self.strategy.load_checkpoint(self.model, self.optimizer, self.scheduler, resume_from)
        ckpt.restore_rng(resume_from, self.strategy.rank)
        self.step = state["global_step"]
        if "stage_state" in state:
            self.loss.load_state_dict(state["stage_state"])
        if self.context.completions_file is not None and self.strategy.is_main:
            drop_records_after(self.context.completions_file, self.step)
        self.last_checkpoint = Path(resume_from)
        self._follow_learning_rate()
        return state

    def _tracker(self, state: dict | None) -> Tracker:
        main = self.strategy.is_main
        reporters = open_reporters(self.cfg, self.output_dir) if main else []
        show = not self.args.disable_tqdm
        tracker = Tracker(self.output_dir, self.total_steps, self.step, main, show, self.loss.summarize, reporters)
        if state is not None:
            tracker.restore(state["log_history"], state["num_tokens"])
        return tracker

    def fit(self, resume_from: Path | None = None) -> dict:
        """Train from the start or from `resume_from` to the last step; the run's results."""
        tracker = self._tracker(self._resume(resume_from))
        start, start_time, losses, run_tokens = self.step, time.perf_counter(), [], 0
        guard = RunGuard(self.strategy, self.args.max_nonfinite_steps, self.args.fp16, self.output_dir / STOP_FILE)
        with guard:
            try:
                for updates in self._steps(self.step):
                    loss, grad_norm, n_tokens, metrics = self.train_step(updates)
                    self.step += 1
                    losses.append(loss)
                    run_tokens += n_tokens
                    if self.faults:
                        self.faults.after_step(self.step, self.strategy.rank)
                    guard.check_finite(self.step, loss, grad_norm, self.last_checkpoint)
                    self._log_eval_save(tracker, loss, grad_norm, n_tokens, metrics)
                    if self.step < self.total_steps and guard.stop_requested():
                        raise guard.preempted(self.step, self._save(tracker, reason="preemption"))
            except RunStopped:
                tracker.close()
                tracker.finish()
                raise
        runtime = time.perf_counter() - start_time
        tracker.close()
        self.tracker, results = tracker, self._results(tracker, start, runtime, losses, run_tokens)
        tracker.finish()
        return results

    def _results(self, tracker: Tracker, start: int, runtime: float, losses: list, run_tokens: int) -> dict:
        """Trainer-style results of the run (and its final evaluation, logged to the tracker)."""
        steps = self.step - start
        results = {
            "epoch": round(self.step / self.schedule.steps_per_epoch, 4),
            "train_loss": sum(losses) / max(len(losses), 1),
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(steps * self._samples_per_step() / max(runtime, 1e-9), 3),
            "train_steps_per_second": round(steps / max(runtime, 1e-9), 4),
            "train_tokens_per_second": round(run_tokens / max(runtime, 1e-9), 2),
            "padding_ratio": round(1 - run_tokens / max(self.padded_tokens, 1), 4),
            "num_tokens": tracker.num_tokens,
            "total_steps": self.total_steps,
        }
        if self.eval_ds is not None:
            evaluated = self.eval_results()
            results.update(evaluated)
            tracker.on_eval(self.step, evaluated, results["epoch"])
        mem = self.strategy.max_memory_allocated()
        if mem:
            results["peak_memory_gb"] = round(mem / 2**30, 3)
            results["memory_after_setup_gb"] = self.memory_after_setup_gb
        if self.planned_peak_gb is not None:
            results["planned_peak_memory_gb"] = self.planned_peak_gb
        results.update(run_metrics.per_rank_memory(self.strategy, self.model))
        results.update(run_metrics.rollout_throughput(self.strategy, self.context.totals))
        return results
