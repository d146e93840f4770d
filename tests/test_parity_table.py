"""One parity table: every backend trains each stage to the per-step losses and the weights of the 1-process run.

Rows are backends (2 ranks unless named otherwise), columns are stages; a cell is the largest |Δloss| over the
per-step losses of that backend's run against the 1-process run with the same global batch. Every run starts
through `lf-dist train`, as a user's (torchrun underneath, two torchrun "nodes" on loopback, or 2 Ray Train
workers on a local cluster), except megatron: lf-dist refuses it without CUDA, so its cells run the worker on
CPU ranks through the test shim, as tests/test_megatron_train.py does. Beside the losses, each cell compares the
exported weights (tests/test_distributed.py's assert_same_training; grpo: its completions token for token, loss,
reward and KL, tests/test_distributed_rl.py's assert_same_rollouts), the world size logged and the tokens
summed over ranks.

The table module runs every cell, writes benchmarks/parity_table.md (also when cells fail), and then fails each
cell above 1e-4, or whose run or weights differ, in a test named for the cell. Run a subset with -k (e.g.
`-k zero3`): only the selected cells run, and the Markdown table is written only when all of them were selected.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, TINY_MODEL
from .test_distributed import _config as _sft_config
from .test_distributed import _free_port, assert_same_training, lf_dist_train, losses, single_run
from .test_distributed_preference import _config as _dpo_config
from .test_distributed_rl import BATCH as RL_BATCH
from .test_distributed_rl import _config as _rl_config
from .test_distributed_rl import _log, assert_same_rollouts
from .test_ray import _on_ray, cluster  # noqa: F401  (cluster: the module's one Ray cluster, for the Ray row)

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
# cells run two at a time: a run's launch, imports, rendezvous and teardown leave a core idle much of the time
# (two 2-rank runs at once took 17 s where one after the other took 23 s here); at most PROCESSES training
# processes at once (hsdp's 4 ranks run alone), and one Ray run at a time (the cluster has 2 CPUs)
JOBS, PROCESSES = 2, 4
_RAY = threading.Lock()
TABLE = ROOT / "benchmarks" / "parity_table.md"
Z2, Z3 = ROOT / "examples/deepspeed/ds_z2_config.json", ROOT / "examples/deepspeed/ds_z3_config.json"


@dataclass(frozen=True)
class Stage:
    """A column: its config, the per-device batch of one of 2 ranks and of the 1-process run (the same global
    batch), the CLI overrides every run of it gets, and how two runs of it are compared."""

    name: str
    config: Callable[[Path], Path]  # writes the config into a folder
    batch: tuple[int, int]
    overrides: tuple[str, ...] = ()
    rollouts: bool = False  # online RL: compared by assert_same_rollouts


STAGES = [
    Stage("sft-lora", lambda root: _sft_config(root, "lora"), (2, 4)),
    Stage("sft-full", lambda root: _sft_config(root, "full"), (2, 4)),
    Stage("dpo-lora", lambda root: _dpo_config(root, "lora"), (2, 4), ("max_steps=10",)),
    # tests/test_distributed_rl.py's grpo run (seed 42, 4 steps of 2 prompts × 4 completions)
    Stage("grpo-lora", lambda root: _rl_config(root, "grpo", "lora"), RL_BATCH["grpo"], rollouts=True),
]
BACKENDS = ["ddp", "fsdp2", "hsdp 2×2", "zero2", "zero3", "2 nodes", "ray ×2", "megatron tp2", "megatron pp2"]
NOT_RUN = {
    ("hsdp 2×2", "grpo-lora"): "not run: no test shows grpo under HSDP",
    ("2 nodes", "grpo-lora"): "not run: no test shows grpo over two nodes",
    ("megatron tp2", "dpo-lora"): "refused: strategy megatron trains stages pt and sft",
    ("megatron pp2", "dpo-lora"): "refused: strategy megatron trains stages pt and sft",
    ("megatron tp2", "grpo-lora"): "refused: strategy megatron trains stages pt and sft, and does not generate",
    ("megatron pp2", "grpo-lora"): "refused: strategy megatron trains stages pt and sft, and does not generate",
}
# megatron fuses q/k/v into linear_qkv and gate/up into linear_fc1, whose LoRA shares one A between them
# (lf_dist/parallel/megatron/lora.py), and draws A from generators of its own: with lora_target all it trains
# another parameterization than peft's, equal at step 1 only. Its LoRA cells train the unfused layers, starting
# (like their 1-process run) from one adapter made by a 1-step run.
MEGATRON_LORA = ("lora_target=o_proj,down_proj",)
CELLS = [(b, s.name) for b in BACKENDS for s in STAGES if (b, s.name) not in NOT_RUN]


@dataclass
class Cell:
    delta: float | None = None  # max |Δloss| over the steps
    seconds: float = 0.0
    error: str | None = None  # the run failed, or its weights, completions, world size or tokens differ


def _without_overwrite(config: Path) -> Path:
    """Ray's runs: the config as a user leaves it, without overwrite_output_dir (each run gets a fresh folder)."""
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace("overwrite_output_dir: true\n", "").replace("overwrite_output_dir: True\n", ""), encoding="utf-8"
    )
    return config


def _two_nodes(config: Path, *overrides: str) -> None:
    """Two torchrun nodes of one rank each on 127.0.0.1 (NNODES=2, NODE_RANK 0 and 1)."""
    base = {
        **os.environ,
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "lf_dist", "train", str(config), *overrides]
    logs = [config.with_name(f"node{r}.log") for r in range(2)]  # files, not pipes: neither node waits on a reader
    procs = []
    for r, log in enumerate(logs):
        with log.open("w", encoding="utf-8") as err:
            env = {**base, "NODE_RANK": str(r)}
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], "".join(log.read_text(encoding="utf-8")[-3000:] for log in logs)


def _megatron(config: Path, out: Path, layout: dict, batch: int) -> None:
    """The worker on 2 CPU ranks through the shim, as tests/test_megatron_train.py runs it, with the config's
    own keys (its YAML, read as the CLI reads it)."""
    from tests.megatron_run import spawn, train_scenario

    keys = yaml.safe_load(config.read_text(encoding="utf-8"))
    keys.update(layout, per_device_train_batch_size=batch)
    spawn(train_scenario, 2, keys, str(out), str(keys.pop("model_name_or_path", TINY_MODEL)))


class _Processes:
    """At most `limit` training processes at once: a run takes as many as it starts, waiting for them."""

    def __init__(self, limit: int):
        self.free, self.changed = limit, threading.Condition()

    @contextlib.contextmanager
    def take(self, count: int):
        with self.changed:
            self.changed.wait_for(lambda: self.free >= count)
            self.free -= count
        try:
            yield
        finally:
            with self.changed:
                self.free += count
                self.changed.notify_all()


def _run(
    backend: str, stage: Stage, folder: Path, ray_cluster: dict | Exception | None, processes: _Processes
) -> tuple[Path, int, float]:
    """Train `stage` on `backend` in `folder`; returns the output folder, the number of ranks and the seconds the
    run took (from its start, after waiting for its turn)."""
    out, common, batch = folder / "out", (f"output_dir={folder / 'out'}", *stage.overrides), stage.batch[0]
    two_ranks = {
        "ddp": ["strategy=ddp"],
        "fsdp2": ["strategy=fsdp2"],
        "zero2": [f"deepspeed={Z2}"],
        "zero3": [f"deepspeed={Z3}"],
    }
    ranks = 4 if backend == "hsdp 2×2" else 2
    folder.mkdir()
    config = stage.config(folder)
    with _RAY if backend == "ray ×2" else contextlib.nullcontext(), processes.take(ranks):
        began = time.monotonic()
        if backend in two_ranks:
            lf_dist_train(config, *common, f"per_device_train_batch_size={batch}", *two_ranks[backend])
        elif backend == "hsdp 2×2":
            per_device = f"per_device_train_batch_size={batch // 2}"
            lf_dist_train(config, *common, "strategy=fsdp2", "fsdp_shard_size=2", per_device, nproc=4, timeout=400)
        elif backend == "2 nodes":
            _two_nodes(config, *common, "strategy=fsdp2", f"per_device_train_batch_size={batch}")
        elif backend == "ray ×2":
            if isinstance(ray_cluster, Exception):
                raise RuntimeError(f"the local Ray cluster did not start: {ray_cluster}")
            store = f"ray_storage_path={folder / 'store'}"  # as tests/test_ray.py's grpo run
            _on_ray(ray_cluster, _without_overwrite(config), *common, f"per_device_train_batch_size={batch}", store)
        elif backend.startswith("megatron"):
            size = "tensor" if backend.endswith("tp2") else "pipeline"
            _megatron(config, out, {f"{size}_model_parallel_size": 2, **_keys(stage.overrides)}, batch * 2)
        else:
            raise ValueError(backend)
        seconds = time.monotonic() - began
    return out, ranks, seconds


def _keys(overrides: tuple[str, ...]) -> dict:
    return dict(o.split("=", 1) for o in overrides)


def _reference(stage: Stage, megatron_lora: bool, root: Path, tmp_path_factory, processes) -> tuple[Stage, Path]:
    """The stage as its cells run it and its 1-process run (sft: the one tests/test_distributed.py compares with,
    made once a session). Megatron's LoRA cells: the unfused layers, trained on from one adapter (MEGATRON_LORA)."""
    batch = f"per_device_train_batch_size={stage.batch[1]}"
    with processes.take(1):
        if megatron_lora:
            start = root / "megatron_lora_start"
            lf_dist_train(stage.config(root), f"output_dir={start}", *MEGATRON_LORA, "max_steps=1", batch, nproc=None)
            stage = replace(stage, overrides=(*stage.overrides, *MEGATRON_LORA, f"adapter_name_or_path={start}"))
        elif stage.name.startswith("sft-"):
            return stage, single_run(tmp_path_factory, stage.name.removeprefix("sft-"))
        out = root / "single" / f"{stage.name}{'-megatron' if megatron_lora else ''}"
        out.parent.mkdir(parents=True, exist_ok=True)
        lf_dist_train(stage.config(out.parent), f"output_dir={out}", *stage.overrides, batch, nproc=None)
    return stage, out


def _compare(stage: Stage, out: Path, ref: Path, ranks: int, cell: Cell) -> None:
    ours, theirs = (_log(out, "loss"), _log(ref, "loss")) if stage.rollouts else (losses(out), losses(ref))
    assert len(ours) == len(theirs) > 0, (len(ours), len(theirs))
    cell.delta = max(abs(a - b) for a, b in zip(ours, theirs))
    if stage.rollouts:
        assert_same_rollouts(out, ref)
    else:
        assert_same_training(out, ref, atol=TOLERANCE)
    first, last = _rows(out)[0], _rows(out)[-1]
    if "world_size" in first:  # megatron's runs through the shim log no peak memory
        assert first["world_size"] == ranks and len(first["peak_memory_gb_per_rank"]) == ranks, first
    if "num_tokens" in last:
        assert last["num_tokens"] == _rows(ref)[-1]["num_tokens"], "tokens summed over ranks differ"


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


def _selected(request) -> list[tuple[str, str]]:
    """The cells whose tests this session runs (all of them unless -k picked some)."""
    ids = {
        item.callspec.id
        for item in request.session.items
        if item.originalname == "test_backend_trains_the_stage_to_the_one_process_losses_and_weights"
    }
    return [c for c in CELLS if _cell_id(*c) in ids]


def _cell_id(backend: str, stage: str) -> str:
    return f"{backend.replace(' ', '-').replace('×', 'x')}-{stage}"


def _cell(backend: str, name: str, reference: Future, root: Path, ray_cluster, processes: _Processes) -> Cell:
    cell = Cell()
    try:
        stage, ref = reference.result()
        out, ranks, cell.seconds = _run(backend, stage, root / _cell_id(backend, name), ray_cluster, processes)
        _compare(stage, out, ref, ranks, cell)
    except Exception as err:  # noqa: BLE001  (a failed cell is reported in the table and by its test)
        text = str(err) if isinstance(err, AssertionError) else traceback.format_exc(limit=-3)
        cell.error = f"{type(err).__name__}: {text.strip()[-3000:]}"
    print(f"[parity] {backend} / {name}: {cell.delta} in {cell.seconds:.0f} s{' FAILED' if cell.error else ''}")
    return cell


@pytest.fixture(scope="module")
def table(request, tmp_path_factory) -> dict[tuple[str, str], Cell]:
    """Runs the selected cells, JOBS at a time (each failure kept, not raised), and writes the Markdown table."""
    start = time.monotonic()
    root = tmp_path_factory.mktemp("parity")
    selected = _selected(request)
    ray_cluster = None
    if any(b == "ray ×2" for b, _ in selected):
        try:
            ray_cluster = request.getfixturevalue("cluster")
        except Exception as err:  # noqa: BLE001  (the Ray row fails with it; the other rows still run)
            ray_cluster = err
    processes = _Processes(PROCESSES)
    with ThreadPoolExecutor(JOBS) as pool:
        refs, futures = {}, {}
        for backend, name in selected:  # the references first: a cell's job waits for its reference's
            key = (name, backend.startswith("megatron") and name.endswith("-lora"))
            if key not in refs:
                stage = next(s for s in STAGES if s.name == name)
                refs[key] = pool.submit(_reference, stage, key[1], root, tmp_path_factory, processes)
        for backend, name in sorted(selected, key=lambda c: [s.name for s in STAGES].index(c[1])):
            key = (name, backend.startswith("megatron") and name.endswith("-lora"))
            futures[backend, name] = pool.submit(_cell, backend, name, refs[key], root, ray_cluster, processes)
        cells = {c: futures[c].result() for c in selected}
    if len(selected) == len(CELLS):
        _write_table(cells, time.monotonic() - start)
    return cells


def _machine() -> str:
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_name()


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def _text(cell: Cell | None, backend: str, stage: str) -> str:
    if cell is None:
        return f"— {NOT_RUN[backend, stage]}"
    value = "no losses" if cell.delta is None else f"{cell.delta:.1e}"
    return f"**{value}: fails** (see below)" if cell.error or cell.delta > TOLERANCE else value


def _write_table(cells: dict[tuple[str, str], Cell], seconds: float) -> None:
    names = [s.name for s in STAGES]
    failed = [c for c, cell in cells.items() if cell.error or cell.delta > TOLERANCE]
    lines = [
        "# Parity table: every backend against the 1-process run",
        "",
        f"Written by `pytest tests/test_parity_table.py -m slow` on {datetime.date.today().isoformat()}, commit "
        f"{_commit()}, on {_machine()}; its runs took {seconds / 60:.1f} min ({JOBS} at a time).",
        "",
        "A cell is the largest |Δloss| over the per-step losses of that backend's run against the 1-process run",
        f"with the same global batch. It passes at ≤ {TOLERANCE:.0e} with the exported weights equal too (rtol 1e-3,",
        "atol 1e-4), the world size logged and the tokens summed over ranks the 1-process run's; grpo also needs",
        "its completions token for token, its reward and KL per step within 1e-4 and its weights within 5e-4.",
        "Losses are logged with 6 decimals (trainer_log.jsonl), so 1.0e-06 is one unit of the last one.",
        "",
        "- sft: alpaca_demo, cutoff_len 96, 4 rows per step, 10 steps; dpo: ranking_demo, pref_beta 0.1, 4 pairs",
        "  per step, 10 steps; grpo: tests/test_distributed_rl.py's run (2 prompts × 4 completions per step,",
        "  4 steps, seed 42). The shipped tiny Llama, fp32, CPU, gloo.",
        "- Rows: 2 ranks under torchrun, except hsdp 2×2 (4 ranks, fsdp_shard_size 2, FSDP2), 2 nodes (two torchrun",
        "  nodes on 127.0.0.1, one rank each, FSDP2), ray ×2 (2 Ray Train workers on a local cluster, FSDP2) and",
        "  megatron (the worker on 2 CPU ranks at TP=2 or PP=2 through tests/megatron_shim.py, as",
        "  tests/test_megatron_train.py runs it: lf-dist refuses strategy megatron without CUDA).",
        "- megatron's LoRA: megatron fuses q/k/v and gate/up into one layer each, whose LoRA shares one A (and draws",
        "  A from its own generators), so with lora_target all it trains another parameterization than peft's,",
        "  equal at step 1 only. Its cells (and their own 1-process run) train o_proj,down_proj from one adapter.",
        "",
        f"**{len(cells) - len(failed)} of {len(cells)} cells pass**"
        + (": failing " + ", ".join(f"{b} / {s}" for b, s in failed) if failed else "."),
        "",
        "| backend | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for backend in BACKENDS:
        row = [_text(cells.get((backend, s)), backend, s) for s in names]
        lines.append(f"| {backend} | " + " | ".join(row) + " |")
    lines += ["", f"Seconds of each run ({JOBS} at a time, so each also paid for its neighbour's):", ""]
    lines += ["| backend | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for backend in BACKENDS:
        row = [f"{cells[backend, s].seconds:.0f}" if (backend, s) in cells else "—" for s in names]
        lines.append(f"| {backend} | " + " | ".join(row) + " |")
    errors = [(c, cell.error) for c, cell in cells.items() if cell.error]
    if errors:
        lines += ["", "## Failures", ""]
        for (backend, stage), error in errors:
            lines += [f"### {backend} / {stage}", "", "```", error, "```", ""]
    TABLE.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


@pytest.mark.parametrize(("backend", "stage"), CELLS, ids=[_cell_id(*c) for c in CELLS])
def test_backend_trains_the_stage_to_the_one_process_losses_and_weights(table, backend, stage):
    cell = table[backend, stage]
    assert cell.error is None, f"{backend} / {stage}: {cell.error}"
    assert cell.delta <= TOLERANCE, f"{backend} / {stage}: max |Δloss| {cell.delta:.2e} > {TOLERANCE:.0e}"
