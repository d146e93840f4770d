"""Run logs: console progress bar, trainer_log.jsonl (LLaMA-Factory's fields), all_results.json, loss plot, and
the `report_to` trackers."""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lf_dist.train.reporters import metrics_of

LOG_FILE = "trainer_log.jsonl"
RESULTS_FILE = "all_results.json"


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _console(line: str, bar=None) -> None:
    """A line on stdout that stays above the progress bar (on stderr), as Hugging Face's Trainer prints."""
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def _short(value):
    return round(value, 4) if isinstance(value, float) else value


def save_metrics(output_dir: Path, results: dict) -> None:
    """train_results.json / eval_results.json, and both merged into all_results.json (kept from an earlier
    call: an evaluation of a trained output_dir adds its eval_* to the training's), as LLaMA-Factory's
    Trainer.save_metrics writes them."""
    path = Path(output_dir) / RESULTS_FILE
    try:
        merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        merged = {}
    evals = {k: v for k, v in results.items() if k.startswith("eval_")}
    trains = {k: v for k, v in results.items() if k not in evals}
    for split, values in (("train", trains), ("eval", evals)):
        if values:
            text = json.dumps(values, indent=2) + "\n"
            (Path(output_dir) / f"{split}_results.json").write_text(text, encoding="utf-8")
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")


def print_metrics(results: dict) -> None:
    """The closing block of train (and eval) metrics, in the Trainer's layout."""
    evals = {k: v for k, v in results.items() if k.startswith("eval_")}
    for split, values in (("train", {k: v for k, v in results.items() if k not in evals}), ("eval", evals)):
        if not values:
            continue
        width = max(map(len, values))
        lines = [f"***** {split} metrics *****"]
        for key in sorted(values):
            value = values[key]
            if key.endswith("_runtime"):
                value = str(datetime.timedelta(seconds=round(value, 2))).rstrip("0").rstrip(".")
            elif isinstance(value, float):
                value = f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.4f}".rstrip("0").rstrip(".")
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            lines.append(f"  {key:<{width}} = {value:>10}")
        _console("\n".join(lines))


class Tracker:
    """Lives on the main rank only; other ranks get a no-op via `enabled=False`.

    `summarize` (the stage's) turns the stage's reduced (sum, count) metrics into logged values.
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        show_progress: bool,
        summarize: Callable[[dict], dict],
        reporters: list | None = None,
    ):
        self.output_dir, self.total_steps, self.enabled = Path(output_dir), total_steps, enabled
        self.summarize = summarize
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
        stage_metrics = self.summarize(w["metrics"])
        entry = {
            **self._timing(step),
            "loss": round(w["loss"] / w["steps"], 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "epoch": round(epoch, 4),
            "num_tokens": self.num_tokens,
            "tokens_per_second": round(w["tokens"] / max(now - w["time"], 1e-9), 2),
            **stage_metrics,
            **(extra or {}),
        }
        self.window = self._new_window(now)
        self._append(entry)
        if self.enabled:  # the Trainer's console line: loss, grad_norm, learning_rate, epoch, the stage's metrics
            shown = {"loss": entry["loss"], "grad_norm": grad_norm, "learning_rate": float(f"{lr:.4g}")}
            shown = {**shown, "epoch": round(epoch, 2), **stage_metrics}
            _console(str({k: _short(v) for k, v in shown.items()}), self.bar)

    def on_eval(self, step: int, results: dict, epoch: float) -> None:
        """`results`: eval_loss and the stage's eval_* metrics."""
        rounded = {k: round(v, 6) for k, v in results.items()}
        self._append({**self._timing(step), **rounded, "epoch": round(epoch, 4)})
        if self.enabled:
            _console(str({**{k: _short(v) for k, v in rounded.items()}, "epoch": round(epoch, 2)}), self.bar)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> None:
        """The run's last line is logged: the trackers write their files and end their runs."""
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []

    def plot(self) -> Path | None:
        """training_loss.png (and eval_loss.png when evaluated; training_reward.png for the rollout stages), like
        LLaMA-Factory's plot_loss."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for key in ("loss", "eval_loss", "reward"):
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
            name = {"loss": "training_loss.png", "eval_loss": "training_eval_loss.png"}.get(key, f"training_{key}.png")
            plt.savefig(self.output_dir / name, format="png", dpi=100)
            plt.close()
        return self.output_dir / "training_loss.png"


def _smooth(values, weight: float = 0.8) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out
