"""Model names as LLaMA-Factory's YAMLs give them: a local folder, or a hub repository (`Qwen/Qwen2.5-7B-Instruct`)
downloaded into the Hugging Face cache (ModelScope's with USE_MODELSCOPE_HUB=1), once per node.

Every model key (model_name_or_path, adapter_name_or_path, ref_model, and any later one) goes through
`local_model`. The first process of a node to take a file lock downloads; the others wait on the lock and find
the files in the cache. The planner needs only config.json (`local_model(..., config_only=True)`), so a plan
that cannot fit is refused before any weight is fetched. The client libraries honour HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and MODELSCOPE_CACHE; `cache_dir`, `model_revision`, `hf_hub_token` and
`ms_hub_token` are LLaMA-Factory's keys for the same.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from lf_dist.config.schema import is_hub_name
from lf_dist.errors import UserError, error_kinds
from lf_dist.hubs import modelscope_client, offline, use_modelscope
from lf_dist.log import get_logger

logger = get_logger(__name__)
# Files a model or adapter is loaded from; the rest of a repository (original/ checkpoints in another format,
# GGUF, ONNX) is never fetched. `*.bin` weights only where a repository has no safetensors.
WANTED = ["*.json", "*.safetensors", "*.bin", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja", "*.npy"]
SKIPPED = ["original/*", "onnx/*", "openvino/*", "coreml/*", "*.pth", "*.gguf", "*.onnx", "*.h5", "*.msgpack"]


def local_model(name: str, model_args, key: str = "model_name_or_path", config_only: bool = False) -> str:
    """The local folder of `name`: itself if it is one, else the hub repository's files in the cache
    (downloaded here if missing; with `config_only`, only config.json)."""
    if Path(name).is_dir() or not is_hub_name(name):
        return name
    return _download(name, key, config_only, model_args.model_revision, model_args.cache_dir, _token(model_args))


def _token(model_args) -> str | None:
    return model_args.ms_hub_token if use_modelscope() else model_args.hf_hub_token


@functools.cache
def _download(name: str, key: str, config_only: bool, revision: str, cache_dir: str | None, token) -> str:
    """Once per process and node: under a lock in the cache's folder, so the other ranks of the node wait and
    then read what the first one fetched."""
    from filelock import FileLock

    lock = _cache_root(cache_dir) / ".locks" / f"lf-dist-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        try:
            if use_modelscope():
                return _from_modelscope(name, config_only, revision, cache_dir, token)
            return _from_huggingface(name, config_only, revision, cache_dir, token)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the client libraries raise many kinds; each becomes one line
            raise UserError(_explain(err, name, key, revision)) from None


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if use_modelscope():
        return Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _from_huggingface(name: str, config_only: bool, revision: str, cache_dir, token) -> str:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    if config_only:
        path = hf_hub_download(name, "config.json", revision=revision, cache_dir=cache_dir, token=token)
        return str(Path(path).parent)
    skipped = SKIPPED
    try:  # a repository with safetensors needs none of its .bin files (often the same weights again)
        files = HfApi().list_repo_files(name, revision=revision, token=token)
        if any(f.endswith(".safetensors") for f in files):
            skipped = [*SKIPPED, "*.bin"]
    except Exception:  # noqa: BLE001 - offline or unreachable: snapshot_download reads the cache or says why
        pass
    folder = snapshot_download(
        name, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=WANTED, ignore_patterns=skipped
    )
    logger.info(f"{name} from the hub: {folder}")
    return folder


def _from_modelscope(name: str, config_only: bool, revision: str, cache_dir, token) -> str:
    snapshot_download = modelscope_client("snapshot_download", f"downloading '{name}'")
    revision = "master" if revision == "main" else revision  # ModelScope's default branch, as LLaMA-Factory maps it
    folder = snapshot_download(
        name,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        allow_patterns=["config.json"] if config_only else WANTED,
        ignore_patterns=SKIPPED,
        local_files_only=offline(),  # ModelScope has no offline switch of its own: HF_HUB_OFFLINE is lf-dist's
    )
    logger.info(f"{name} from the hub: {folder}")
    return folder


def _explain(err: Exception, name: str, key: str, revision: str) -> str:
    """One line: what could not be had, and what to do."""
    kinds = error_kinds(err)
    hub = "ModelScope" if use_modelscope() else "the Hugging Face Hub"
    if not use_modelscope():
        from huggingface_hub import constants

        hub += f" ({constants.ENDPOINT})"
    if "RevisionNotFoundError" in kinds:
        return f"model_revision: '{revision}' is not a branch, tag or commit of '{name}' on {hub}"
    if kinds & {"GatedRepoError", "RepositoryNotFoundError", "NotExistError"}:
        return (
            f"{key}: '{name}' is neither a local folder nor a model on {hub} (a private or gated model needs a token: "
            "HF_TOKEN or hf_hub_token)"
        )
    reason = "HF_HUB_OFFLINE is set and it is not in the cache" if offline() else f"{hub} could not be reached"
    return (
        f"{key}: cannot get '{name}': {reason}; download it where the hub can be reached and pass its folder "
        "(or fill the cache there and set HF_HUB_OFFLINE=1)"
    )
