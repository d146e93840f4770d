"""Several ranks, one preprocessing: the others wait on a file lock, never inside a collective."""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from .conftest import base_overrides, stage_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, shared: str, out: str, build_seconds: float) -> None:
    import torch.distributed as dist

    from lf_dist.data.pipeline import prepare_shared

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=3),
    )
    target = Path(shared)

    def build():  # slower than the process group's timeout
        time.sleep(build_seconds)
        tmp = target.with_name(target.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "dataset_dict.json").write_text("{}", encoding="utf-8")
        tmp.rename(target)

    built = prepare_shared(target, build)
    dist.barrier()  # would time out after 3 s had the waiting rank waited here instead of on the lock
    Path(out, f"rank{rank}.json").write_text(json.dumps({"built": built}), encoding="utf-8")
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_rank_preprocesses_while_the_other_waits_past_the_collective_timeout(tmp_path):
    ctx = mp.get_context("spawn")
    port, shared = _free_port(), tmp_path / "cache" / "data"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(shared), str(tmp_path), 6.0)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    built = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8"))["built"] for r in range(2)]
    assert sorted(built) == [False, True]


def _build_rank(rank: int, out_dir: str, cache: str, world_size: int = 2) -> None:
    if world_size > 1:
        os.environ["LF_DIST_CACHE"] = cache
    import datasets
    from transformers import AutoTokenizer

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template
    from lf_dist.run_checks import load_config

    datasets.disable_progress_bars()
    cfg = load_config(None, base_overrides(Path(out_dir) / "o", dataset="alpaca_demo,sharegpt_demo", val_size=0.1))
    tok = AutoTokenizer.from_pretrained(cfg.model.model_name_or_path)
    template = get_template(cfg.data.template, tok, cfg.data)
    fix_tokenizer(template, tok)
    bundle = build_datasets(cfg, tok, template, stage_data(cfg), world_size=world_size)
    rows = {"train": list(map(list, bundle.train["input_ids"])), "eval": list(map(list, bundle.eval["input_ids"]))}
    Path(out_dir, f"rows{rank}.json").write_text(json.dumps(rows), encoding="utf-8")


@pytest.mark.slow
def test_ranks_share_one_preprocessed_copy_equal_to_single_process(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_rank, args=(r, str(tmp_path), str(tmp_path / "cache"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text(encoding="utf-8")) for r in range(2)]
    assert rows[0] == rows[1]
    assert len(list((tmp_path / "cache" / "tokenized").glob("*/dataset_dict.json"))) == 1
    _build_rank(9, str(tmp_path), str(tmp_path / "cache_single"), world_size=1)  # the 1-process pipeline
    assert json.loads((tmp_path / "rows9.json").read_text(encoding="utf-8")) == rows[0]
