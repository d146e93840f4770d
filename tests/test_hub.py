"""Hub names, as LLaMA-Factory's YAMLs give them: `model_name_or_path: org/model` and `hf_hub_url` / `ms_hub_url`
datasets are downloaded once per node (from a stand-in hub on 127.0.0.1: these machines reach no real one), the
plan reads config.json before any weight, a second run works offline, and a hub that cannot be reached is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_DIR, TINY_MODEL
from .hub_server import StandInHub

MODEL = "org/tiny"
DATASET = "org/alpaca-mini"
WEIGHTS = "model.safetensors"
_DROP = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict:
    """A dataset repository (the demo alpaca records as train.json) and a dataset_dir that names it by hub URL."""
    root = tmp_path_factory.mktemp("repos")
    (root / "alpaca").mkdir()
    records = json.loads((DATA_DIR / "alpaca_demo.json").read_text(encoding="utf-8"))[:64]
    (root / "alpaca" / "train.json").write_text(json.dumps(records), encoding="utf-8")
    (root / "data").mkdir()
    registry = {"hub_alpaca": {"hf_hub_url": DATASET, "ms_hub_url": DATASET}}
    (root / "data" / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    return {"dataset": root / "alpaca", "dataset_dir": root / "data"}


def _env(hub: StandInHub, home: Path, **extra: str) -> dict:
    """A user's machine with hub access: caches under `home`, the endpoints pointed at the stand-in."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("MODELSCOPE_")}
    env |= hub.client_env() | {
        "HF_HOME": str(home / "hf"),
        "MODELSCOPE_CACHE": str(home / "modelscope"),
        "MODELSCOPE_HOME": str(home / "modelscope-home"),
        "LF_DIST_CACHE": str(home / "lf_dist"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return env | extra


def _config(tmp_path: Path, repos: dict, **keys) -> Path:
    values = {
        "model_name_or_path": MODEL,
        "dataset": "hub_alpaca",
        "dataset_dir": repos["dataset_dir"],
        "template": "chatml",
        "cutoff_len": 128,
        "output_dir": tmp_path / "out",
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "logging_steps": 1,
        "disable_tqdm": True,
        **keys,
    }
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()), encoding="utf-8")
    return path


def _lf_dist(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", *args], env=env, capture_output=True, text=True, timeout=400, check=False
    )


def _losses(out: Path) -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("lf-dist: ")]
    return line


@pytest.mark.slow
def test_two_ranks_download_each_file_once_train_and_a_second_run_works_offline(repos, tmp_path):
    model_files = sorted(p.name for p in TINY_MODEL.iterdir() if p.is_file())
    with StandInHub(models={MODEL: TINY_MODEL}, datasets={DATASET: repos["dataset"]}) as hub:
        env = _env(hub, tmp_path, FORCE_TORCHRUN="1", NPROC_PER_NODE="2")
        proc = _lf_dist(env, "train", str(_config(tmp_path, repos)))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert len(_losses(tmp_path / "out")) == 3
        assert {f: hub.file_downloads(MODEL, f) for f in model_files} == dict.fromkeys(model_files, 1)
        assert hub.file_downloads(DATASET, "train.json") == 1  # one rank preprocessed, the other read its result
        gets = [r.path for r in hub.requests if r.method == "GET" and r.path.startswith(f"/{MODEL}/resolve/")]
        assert gets[0].endswith("/config.json") and gets.index(next(g for g in gets if g.endswith(WEIGHTS))) > 0
    # the hub is gone; the cache is filled: with HF_HUB_OFFLINE=1 one process trains the same global batch
    offline = _env(hub, tmp_path, HF_HUB_OFFLINE="1")
    one_rank = _config(tmp_path, repos, output_dir=tmp_path / "again", per_device_train_batch_size=4)
    again = _lf_dist(offline, "train", str(one_rank))
    assert again.returncode == 0, again.stderr[-4000:]
    assert _losses(tmp_path / "again") == pytest.approx(_losses(tmp_path / "out"), abs=1e-4)


def test_the_plan_reads_config_json_alone_and_a_plan_that_cannot_fit_fetches_no_weights(repos, tmp_path):
    with StandInHub(models={MODEL: TINY_MODEL}, datasets={DATASET: repos["dataset"]}) as hub:
        env = _env(hub, tmp_path)
        plan = _lf_dist(env, "plan", str(_config(tmp_path, repos)), "--json")
        assert plan.returncode == 0, plan.stderr[-3000:]
        assert json.loads(plan.stdout)["num_params"] == 427_488
        too_big = _lf_dist(env, "train", str(_config(tmp_path, repos, per_device_train_batch_size=10**6)))
        assert _one_line(too_big).startswith("lf-dist: error: plan: ")
        served = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
        assert served == {"config.json"} and hub.file_downloads(DATASET, "train.json") == 0
        assert not (tmp_path / "out").exists()


def test_a_hub_that_cannot_be_reached_is_one_line_naming_the_model_and_the_fix(repos, tmp_path):
    hub = StandInHub(models={MODEL: TINY_MODEL})
    hub.start()
    hub.stop()  # a closed port
    proc = _lf_dist(_env(hub, tmp_path), "train", str(_config(tmp_path, repos)))
    line = _one_line(proc)
    assert line.startswith(f"lf-dist: error: model_name_or_path: cannot get '{MODEL}': the Hugging Face Hub ")
    assert "could not be reached" in line and "HF_HUB_OFFLINE=1" in line and "pass its folder" in line
    missing = _lf_dist(_env(hub, tmp_path, HF_HUB_OFFLINE="1"), "train", str(_config(tmp_path, repos)))
    assert "HF_HUB_OFFLINE is set and it is not in the cache" in _one_line(missing)


def test_a_private_model_needs_the_token_and_hf_token_is_sent(repos, tmp_path):
    with StandInHub(models={MODEL: TINY_MODEL}, token="hf_secret") as hub:
        config = _config(tmp_path, repos)
        refused = _lf_dist(_env(hub, tmp_path), "plan", str(config))
        assert "is neither a local folder nor a model on the Hugging Face Hub" in _one_line(refused)
        assert "HF_TOKEN" in _one_line(refused)
        ok = _lf_dist(_env(hub, tmp_path, HF_TOKEN="hf_secret"), "plan", str(config))
        assert ok.returncode == 0, ok.stderr[-3000:]
        by_key = _lf_dist(_env(hub, tmp_path / "k"), "plan", str(config), "hf_hub_token=hf_secret")
        assert by_key.returncode == 0, by_key.stderr[-3000:]  # LLaMA-Factory's key for the same
        assert not any("hf_secret" in p.read_text(encoding="utf-8") for p in tmp_path.rglob("*.json"))


def test_modelscope_models_and_datasets_with_use_modelscope_hub(repos, tmp_path):
    with StandInHub(models={MODEL: TINY_MODEL}, datasets={DATASET: repos["dataset"]}) as hub:
        env = _env(hub, tmp_path, USE_MODELSCOPE_HUB="1")
        proc = _lf_dist(env, "train", str(_config(tmp_path, repos)))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert len(_losses(tmp_path / "out")) == 3
        assert hub.file_downloads(MODEL, WEIGHTS) == 1 and hub.file_downloads(DATASET, "train.json") == 1
        assert all(r.path.startswith("/api/v1/") for r in hub.requests)  # ModelScope's API, not the HF Hub's


def test_an_adapter_named_by_hub_name_is_downloaded_for_chat(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    with StandInHub(models={MODEL: TINY_MODEL, "org/tiny-lora": adapter}) as hub:
        chat = tmp_path / "chat.yaml"
        chat.write_text(
            f"model_name_or_path: {MODEL}\nadapter_name_or_path: org/tiny-lora\ntemplate: chatml\nmax_new_tokens: 4\n",
            encoding="utf-8",
        )
        proc = subprocess.run(
            [sys.executable, "-m", "lf_dist", "chat", str(chat)],
            input="hello\nexit\n",
            env=_env(hub, tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Assistant: " in proc.stdout
        assert hub.file_downloads("org/tiny-lora", "adapter_model.safetensors") == 1
