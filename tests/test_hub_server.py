"""The stand-in hub (tests/hub_server.py) serves the real huggingface_hub, transformers, datasets, modelscope."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.hub_server import StandInHub

MODEL = "org/tiny"
MODEL_FILES = sorted(p.relative_to(TINY_MODEL).as_posix() for p in TINY_MODEL.rglob("*") if p.is_file())
README = """\
---
configs:
- config_name: alpha
  data_files:
  - split: train
    path: alpha/train.jsonl
  - split: test
    path: alpha/test.jsonl
- config_name: beta
  data_files: beta/*.json
---
# A tiny dataset with two subsets
"""
# Client processes must not inherit offline switches (conftest sets HF_HUB_OFFLINE=1) or the developer's tokens.
_DROP = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@pytest.fixture(scope="module")
def data_repos(tmp_path_factory) -> dict[str, Path]:
    """'org/plain': json files at the root and in a sub-folder, no README; 'org/subsets': README with configs."""
    root = tmp_path_factory.mktemp("repos")
    files = {
        "plain/train.jsonl": '{"q": "root-1"}\n{"q": "root-2"}\n',
        "plain/sub/train.json": '[{"q": "sub-1"}]',
        "subsets/README.md": README,
        "subsets/alpha/train.jsonl": '{"q": "alpha-train"}\n',
        "subsets/alpha/test.jsonl": '{"q": "alpha-test-1"}\n{"q": "alpha-test-2"}\n',
        "subsets/beta/part.json": '[{"q": "beta-1"}]',
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return {"org/plain": root / "plain", "org/subsets": root / "subsets"}


@pytest.fixture
def hub(data_repos):
    with StandInHub(models={MODEL: TINY_MODEL}, datasets=data_repos) as server:
        yield server


def run_client(hub: StandInHub, home: Path, code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter pointed at `hub` with caches under `home`; return its last printed JSON."""
    full_env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("MODELSCOPE_")}
    full_env |= hub.client_env() | {
        "HF_HOME": str(home / "hf"),
        "MODELSCOPE_CACHE": str(home / "modelscope"),
        "MODELSCOPE_HOME": str(home / "modelscope-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    full_env |= env
    prelude = "import json, os, sys\nfrom pathlib import Path\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=full_env, capture_output=True, text=True
    )
    log = "\n".join(f"{r.method} {r.status} {r.path}" for r in hub.requests)
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\nrequests:\n{log}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_files(folder: str, source: Path, names: list[str]) -> bool:
    return all((Path(folder) / n).read_bytes() == (source / n).read_bytes() for n in names)


SNAPSHOT = """
from {module} import snapshot_download
path = snapshot_download("org/tiny", revision=os.environ.get("REVISION"), local_files_only="LFO" in os.environ)
files = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())
print(json.dumps({{"path": path, "files": files}}))
"""
HF_SNAPSHOT, MS_SNAPSHOT = SNAPSHOT.format(module="huggingface_hub"), SNAPSHOT.format(module="modelscope")


def test_snapshot_download_then_cached_then_offline(hub, tmp_path):
    first = run_client(hub, tmp_path, HF_SNAPSHOT)
    assert first["files"] == MODEL_FILES and same_files(first["path"], TINY_MODEL, MODEL_FILES)
    assert first["path"].endswith(f"snapshots/{hub.commit(MODEL)}")
    assert [hub.file_downloads(MODEL, f) for f in MODEL_FILES] == [1] * len(MODEL_FILES)
    # fresh cache: harness registry, info (main -> sha), tree listing, then a HEAD and a GET per file
    assert len(hub.requests) == 3 + 2 * len(MODEL_FILES)
    assert all(r.status == 200 and r.authorization is None for r in hub.requests)

    hub.clear()
    assert run_client(hub, tmp_path, HF_SNAPSHOT) == first  # online, warm cache: only resolves "main" to its sha
    assert [r.path for r in hub.requests] == [f"/api/models/{MODEL}/revision/main"]

    hub.clear()
    assert run_client(hub, tmp_path, HF_SNAPSHOT, LFO="1") == first  # local_files_only: no request at all
    assert hub.requests == []

    hub.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(hub.url.rsplit(":", 1)[1])), timeout=5)
    assert run_client(hub, tmp_path, HF_SNAPSHOT, HF_HUB_OFFLINE="1") == first


def test_download_at_commit_and_unknown_revision(hub, tmp_path):
    sha = hub.commit(MODEL)
    out = run_client(hub, tmp_path, HF_SNAPSHOT, REVISION=sha)
    assert out["path"].endswith(f"snapshots/{sha}") and same_files(out["path"], TINY_MODEL, MODEL_FILES)
    assert not any("/revision/" in r.path for r in hub.requests)  # a commit sha needs no resolving
    out = run_client(
        hub,
        tmp_path / "other",
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RevisionNotFoundError
        path = hf_hub_download("org/tiny", "config.json", revision=os.environ["SHA"])
        try:
            hf_hub_download("org/tiny", "config.json", revision="v9")
            error = None
        except RevisionNotFoundError as err:
            error = type(err).__name__
        print(json.dumps({"path": path, "error": error}))
        """,
        SHA=sha,
    )
    assert Path(out["path"]).read_bytes() == (TINY_MODEL / "config.json").read_bytes()
    assert f"/{sha}/" in out["path"] and out["error"] == "RevisionNotFoundError"
    assert hub.file_downloads(MODEL, "config.json") == 2  # once per fresh cache


def test_token_is_required_and_sent(data_repos, tmp_path):
    code = """
    from huggingface_hub import hf_hub_download
    try:
        print(json.dumps({"path": hf_hub_download("org/tiny", "config.json")}))
    except Exception as err:
        print(json.dumps({"error": type(err).__name__}))
    """
    with StandInHub(models={MODEL: TINY_MODEL}, token="hf_secret") as hub:
        assert run_client(hub, tmp_path / "anonymous", code) == {"error": "RepositoryNotFoundError"}
        assert {r.status for r in hub.requests} == {401} and hub.file_downloads(MODEL, "config.json") == 0
        hub.clear()
        assert "path" in run_client(hub, tmp_path / "authorized", code, HF_TOKEN="hf_secret")
        assert hub.file_downloads(MODEL, "config.json") == 1
        assert {r.authorization for r in hub.requests if r.path != "/api/agent-harnesses"} == {"Bearer hf_secret"}


def test_transformers_from_pretrained(hub, tmp_path):
    out = run_client(
        hub,
        tmp_path,
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        local = Path(os.environ["LOCAL"])
        config = AutoConfig.from_pretrained("org/tiny")
        tok = AutoTokenizer.from_pretrained("org/tiny")
        model = AutoModelForCausalLM.from_pretrained("org/tiny")
        ref = AutoModelForCausalLM.from_pretrained(local)
        def plain(cfg):
            return {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}
        print(json.dumps({
            "config": plain(config) == plain(AutoConfig.from_pretrained(local)),
            "tokens": tok("hello hub")["input_ids"] == AutoTokenizer.from_pretrained(local)("hello hub")["input_ids"],
            "weights": all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values())),
        }))
        """,
        LOCAL=str(TINY_MODEL),
    )
    assert out == {"config": True, "tokens": True, "weights": True}
    served = {f: hub.file_downloads(MODEL, f) for f in MODEL_FILES}
    assert served["config.json"] == served["model.safetensors"] == served["tokenizer.json"] == 1
    assert max(served.values()) == 1


def test_datasets_load_dataset_subsets_splits_and_data_dir(hub, tmp_path):
    out = run_client(
        hub,
        tmp_path,
        """
        import datasets
        cache = os.environ["HF_HOME"] + "/ds-cache"
        def rows(repo, name=None, data_dir=None, split="train"):
            # as LLaMA-Factory calls it
            ds = datasets.load_dataset(path=repo, name=name, data_dir=data_dir, data_files=None, split=split,
                                       cache_dir=cache, token=None, num_proc=None, streaming=False)
            return sorted(r["q"] for r in ds)
        print(json.dumps({
            "alpha-test": rows("org/subsets", name="alpha", split="test"),
            "alpha-train": rows("org/subsets", name="alpha"),
            "beta": rows("org/subsets", name="beta"),
            "dir": rows("org/subsets", data_dir="alpha", split="test"),
            "sub": rows("org/plain", data_dir="sub"),
            "plain": rows("org/plain"),
        }))
        """,
    )
    assert out == {
        "alpha-test": ["alpha-test-1", "alpha-test-2"],
        "alpha-train": ["alpha-train"],
        "beta": ["beta-1"],
        "dir": ["alpha-test-1", "alpha-test-2"],
        "sub": ["sub-1"],
        "plain": ["root-1", "root-2", "sub-1"],  # no README: both train files make the train split
    }
    data_files = ["train.jsonl", "sub/train.json"], ["alpha/train.jsonl", "alpha/test.jsonl", "beta/part.json"]
    for repo, names in zip(("org/plain", "org/subsets"), data_files):
        assert [hub.file_downloads(repo, n, "dataset") for n in names] == [1] * len(names)
    assert hub.file_downloads("org/subsets", "README.md") == 1


def test_modelscope_snapshot_download(hub, tmp_path):
    sha = hub.commit(MODEL)
    out = run_client(
        hub,
        tmp_path,
        """
        from modelscope import snapshot_download
        print(json.dumps([snapshot_download("org/tiny", revision) for revision in (None, None, os.environ["SHA"])]))
        """,
        SHA=sha,
    )
    assert out[0] == out[1] and out[2].endswith(f"snapshots/{sha}")  # ModelScope caches per revision *name*
    assert all(same_files(path, TINY_MODEL, MODEL_FILES) for path in out)
    content = [r.path for r in hub.requests if r.method == "GET" and "FilePath=" in r.path]
    for f in MODEL_FILES:  # the second download of master came from the cache
        assert [p for p in content if p.endswith(f"FilePath={f}")] == [
            f"/api/v1/models/{MODEL}/repo?Revision={rev}&FilePath={f}" for rev in ("master", sha)
        ]

    hub.stop()
    cached = run_client(hub, tmp_path, MS_SNAPSHOT, LFO="1")
    assert cached == {"path": out[0], "files": MODEL_FILES}


def test_modelscope_token_is_sent(tmp_path):
    with StandInHub(models={MODEL: TINY_MODEL}, token="ms_secret") as hub:
        out = run_client(hub, tmp_path, MS_SNAPSHOT, MODELSCOPE_API_TOKEN="ms_secret")
        assert same_files(out["path"], TINY_MODEL, MODEL_FILES)
        probe = "/api/v1/repos/internalAccelerationInfo"  # modelscope's region probe goes without credentials
        assert {r.authorization for r in hub.requests if r.path != probe} == {"Bearer ms_secret"}


def test_http_surface(hub):
    """Headers, ranges and errors as the Hub sends them, checked without a client library."""

    def fetch(path: str, method: str = "GET", **headers: str):
        request = urllib.request.Request(hub.url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    data = (TINY_MODEL / "config.json").read_bytes()
    status, headers, body = fetch(f"/{MODEL}/resolve/main/config.json", "HEAD")
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(data))
    assert headers["X-Repo-Commit"] == hub.commit(MODEL) and headers["ETag"].startswith('"')
    assert fetch(f"/{MODEL}/resolve/main/config.json", Range="bytes=5-9")[::2] == (206, data[5:10])
    assert hub.file_downloads(MODEL, "config.json") == 1  # the HEAD did not count

    status, headers, _ = fetch(f"/{MODEL}/resolve/main/missing.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", hub.commit(MODEL))
    assert fetch(f"/{MODEL}/resolve/v2/config.json")[1]["X-Error-Code"] == "RevisionNotFound"
    assert fetch("/org/nope/resolve/main/config.json")[1]["X-Error-Code"] == "RepoNotFound"
    assert fetch("/api/whatever")[0] == 404 and hub.requests[-1].path == "/api/whatever"

    status, _, body = fetch("/api/datasets/org/plain/tree/main?recursive=true")
    assert status == 200
    assert [(e["type"], e["path"]) for e in json.loads(body)] == [
        ("directory", "sub"),
        ("file", "sub/train.json"),
        ("file", "train.jsonl"),
    ]
