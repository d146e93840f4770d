"""`report_to` trackers, read back with each real library: what they hold equals trainer_log.jsonl."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from lf_dist.cli import main

from .conftest import base_overrides
from .test_distributed import _config, lf_dist_train

STEPS = 6


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch):
    """Reading a local MLflow file store back needs MLflow 3's opt-in, as lf-dist sets it for writing."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("trackers")
    (root / "empty.yaml").write_text("{}\n", encoding="utf-8")
    out = root / "out"
    extra = dict(
        max_steps=STEPS,
        val_size=0.1,
        eval_strategy="steps",
        eval_steps=3,
        run_name="tiny-run",
        report_to="[tensorboard,wandb,mlflow]",
        logging_dir=str(root / "tb"),
    )
    try:
        assert main(["train", str(root / "empty.yaml"), *base_overrides(out, **extra)]) == 0
    finally:
        mp.undo()
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return root, out, log


def _series(log: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["current_steps"], e[key]) for e in log if key in e]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 1e-6) -> bool:
    """Same steps, values equal within `rel` (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx(
        [v for _, v in want], rel=rel
    )


def test_tensorboard_event_files_hold_the_logged_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, log = run
    files = list((root / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("eval/loss", "eval_loss")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = _series(log, key)
        assert len(want) > 0 and _same(got, want)


def _wandb_records(path: Path):
    """Records of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_run_folder_holds_the_logged_losses_and_config(run):
    _, out, log = run
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    history, config = [], {}
    for record in _wandb_records(next(Path(runs[0]).glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history.append((items["_step"], items["train/loss"]))
        elif kind == "run":
            assert record.run.display_name == "tiny-run"
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    assert _same(history, _series(log, "loss"))
    assert config["learning_rate"] == 1e-3 and config["lora_rank"] == 8


def test_mlflow_file_store_holds_the_logged_losses_and_params(run):
    from mlflow.tracking import MlflowClient

    _, out, log = run
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lf-dist"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "tiny-run" and mlrun.data.params["lora_rank"] == "8"
    got = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert _same(sorted(got), _series(log, "loss"))
    evals = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "eval/loss")]
    assert _same(sorted(evals), sorted(_series(log, "eval_loss")))


@pytest.mark.slow
def test_only_rank_zero_reports(tmp_path):
    out = tmp_path / "ddp"
    lf_dist_train(
        _config(tmp_path, "lora"),
        f"output_dir={out}",
        "strategy=ddp",
        "max_steps=3",
        "report_to=[tensorboard,mlflow]",
        f"logging_dir={tmp_path / 'tb'}",
    )
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiments = [e for e in client.search_experiments() if e.name == "lf-dist"]
    assert len(experiments) == 1 and len(client.search_runs([experiments[0].experiment_id])) == 1
