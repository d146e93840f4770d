"""Run logs: console progress bar, trainer_log.jsonl (LLaMA-Factory's fields), all_results.json, loss plot, and
the `report_to` trackers."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path

from lf_dist.train.reporters import metrics_of

LOG_FILE = "trainer_log.jsonl"


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Tracker:
    """Lives on the main rank only; other ranks get a no-op via `enabled=False`.

    `summarize` turns the stage's reduced (sum, count) metrics into logged values; `shown` names the eval
    results the console prints after an evaluation (both come from the stage).
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        show_progress: bool,
        summarize: Callable[[dict], dict],
        shown: tuple[str, ...] = ("eval_loss",),
        reporters: list | None = None,
    ):
        self.output_dir, self.total_steps, self.enabled = Path(output_dir), total_steps, enabled
        self.summarize, self.shown = summarize, shown
        self.reporters = reporters or []  # report_to trackers (train/reporters.py), main rank only
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.window = self._new_window(self.start_time)
        self.num_tokens = 0
        self.history: list[dict] = []
        self.bar = None
        if enabled and show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    @staticmethod
    def _new_window(now: float) -> dict:
        return {"loss": 0.0, "steps": 0, "tokens": 0, "time": now, "metrics": {}}

    def restore(self, history: list[dict], num_tokens: int) -> None:
        """On resume: keep the log lines up to the checkpoint, so the file matches an uninterrupted run."""
        self.history, self.num_tokens = list(history), num_tokens
        if self.enabled:
            self._rewrite()

    def _rewrite(self) -> None:
        lines = "".join(json.dumps(e) + "\n" for e in self.history)
        (self.output_dir / LOG_FILE).write_text(lines, encoding="utf-8")

    def _append(self, entry: dict) -> None:
        self.history.append(entry)
        if self.enabled:
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            for reporter in self.reporters:
                reporter.log(entry["current_steps"], metrics_of(entry))

    def _timing(self, step: int) -> dict:
        elapsed = time.perf_counter() - self.start_time
        done = max(step - self.start_step, 1)
        remaining = elapsed / done * (self.total_steps - step)
        return {
            "current_steps": step,
            "total_steps": self.total_steps,
            "percentage": round(100 * step / self.total_steps, 2),
            "elapsed_time": _hms(elapsed),
            "remaining_time": _hms(remaining),
        }

    def on_step(
        self,
        step: int,
        loss: float,
        tokens: int,
        lr: float,
        grad_norm: float,
        epoch: float,
        log_now: bool,
        extra: dict | None = None,
        metrics: dict | None = None,
    ) -> None:
        """`metrics`: the stage's (sum, count) pairs for this step, logged as means over the logging window."""
        self.num_tokens += tokens
        w = self.window
        w["loss"], w["steps"], w["tokens"] = w["loss"] + loss, w["steps"] + 1, w["tokens"] + tokens
        for key, value in (metrics or {}).items():
            w["metrics"][key] = w["metrics"][key] + value if key in w["metrics"] else value
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not log_now:
            return
        now = time.perf_counter()
        entry = {
            **self._timing(step),
            "loss": round(w["loss"] / w["steps"], 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "epoch": round(epoch, 4),
            "num_tokens": self.num_tokens,
            "tokens_per_second": round(w["tokens"] / max(now - w["time"], 1e-9), 2),
            **self.summarize(w["metrics"]),
            **(extra or {}),
        }
        self.window = self._new_window(now)
        self._append(entry)

    def on_eval(self, step: int, results: dict, epoch: float) -> None:
        """`results`: eval_loss and the stage's eval_* metrics."""
        rounded = {k: round(v, 6) for k, v in results.items()}
        self._append({**self._timing(step), **rounded, "epoch": round(epoch, 4)})
        if self.bar is not None:
            shown = ", ".join(f"{k} {rounded[k]:.4f}" for k in self.shown if k in rounded)
            self.bar.write(f"[lf-dist] step {step}: {shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> None:
        """The run's last line is logged: the trackers write their files and end their runs."""
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []

    def plot(self) -> Path | None:
        """training_loss.png (and eval_loss.png when evaluated), like LLaMA-Factory's plot_loss."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for key in ("loss", "eval_loss"):
            points = [(e["current_steps"], e[key]) for e in self.history if key in e]
            if not points:
                continue
            steps, values = zip(*points)
            plt.figure()
            plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
            plt.plot(steps, _smooth(values), color="#1f77b4", label="smoothed")
            plt.title(f"{key} of {self.output_dir}")
            plt.xlabel("step")
            plt.ylabel(key)
            plt.legend()
            name = "training_loss.png" if key == "loss" else "training_eval_loss.png"
            plt.savefig(self.output_dir / name, format="png", dpi=100)
            plt.close()
        return self.output_dir / "training_loss.png"


def _smooth(values, weight: float = 0.8) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out
