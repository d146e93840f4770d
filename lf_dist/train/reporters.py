"""`report_to` trackers: TensorBoard, Weights & Biases, MLflow. The main rank's Tracker hands each one the
numbers of every log line (train/..., eval/...), keyed by step; trainer_log.jsonl stays the record of truth.

Each library is an optional extra, imported only when named (config/ has checked that it is installed):
- tensorboard: event files under `logging_dir` (default output_dir/runs/<time>_<host>, Hugging Face's);
- wandb: its own settings (WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR; default dir output_dir);
- mlflow: MLFLOW_TRACKING_URI, else a local file store at output_dir/mlruns (MLflow 3's opt-in for it is
  set); MLFLOW_EXPERIMENT_NAME.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

# log-line fields that are bookkeeping, not metrics
_NOT_METRICS = {"current_steps", "total_steps", "percentage", "elapsed_time", "remaining_time"}


def metrics_of(entry: dict) -> dict[str, float]:
    """A log line as tracker metrics: eval_x → eval/x, everything else → train/x; numbers only."""
    out = {}
    for key, value in entry.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def default_logging_dir(output_dir: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
    return Path(output_dir) / "runs" / f"{stamp}_{socket.gethostname()}"


class TensorBoard:
    def __init__(self, cfg, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(cfg.train.logging_dir) if cfg.train.logging_dir else default_logging_dir(output_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg, output_dir: Path):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lf-dist"),
            name=cfg.train.run_name,
            dir=os.environ.get("WANDB_DIR", str(output_dir)),
            config=cfg.to_dict(),
            reinit="finish_previous",
        )

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, cfg, output_dir: Path):
        import mlflow

        self.mlflow = mlflow
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; restored on close, so that a later run in this
        # process (tests, notebooks) does not log into this run's store
        self.user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        uri = self.user_uri or (Path(output_dir) / "mlruns").resolve().as_uri()
        self.opted_in = uri.startswith("file:") and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
        if self.opted_in:  # MLflow 3 keeps its file store behind an opt-in; a local store is asked for
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "lf-dist"))
        self.run = mlflow.start_run(run_name=cfg.train.run_name)
        params = {k: str(v)[:250] for k, v in cfg.to_dict().items() if v is not None}
        mlflow.log_params(params)

    def log(self, step: int, metrics: dict) -> None:
        # MLflow's metric names allow '/', as HF's callback sends them
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
        if self.user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        if self.opted_in:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


REPORTERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_reporters(cfg, output_dir: Path) -> list:
    return [REPORTERS[name](cfg, output_dir) for name in cfg.train.report_to]
