"""Run a pytest selection as two pytest processes at once over disjoint sets of test files.

    python tests/shards.py -m "slow and not cuda" --durations=40

On the 2-core CI machine a multi-process test leaves a core idle much of the time (imports, process start,
rendezvous, a single-threaded Python loop): the parity table measured two of its 2-rank runs side by side in 17 s
against 23 s one after the other. `make test-slow` uses it; the in-process fast suite does not (it keeps both
cores busy: as two shards it took as long as in one process). The parity table runs first and alone: it runs
two cells at a time itself, and beside a shard it took 700 s where alone it takes 350 (its limit is 10 minutes).
The other files are dealt by their measured seconds, largest first, to the lighter shard. The files that start a
Ray cluster share a shard: `ray stop` ends every cluster on the machine. Each run has its own --basetemp; shard 0
prints as it runs, shard 1's output follows when both are done. The exit code is the worst of them (no test
selected in a run counts as passed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# seconds per file under `-m "slow and not cuda"` on the 2-core build machine (pytest --durations, 2026-12-07);
# an unlisted file counts SLOW_TEST seconds per test function (1 s outside the slow suite)
SLOW_SECONDS = {
    "test_ray.py": 275, "test_deepspeed_reshard.py": 164, "test_distributed_rl.py": 146,
    "test_megatron_train.py": 142, "test_speed_smoke.py": 118, "test_distributed.py": 104,
    "test_plan_accuracy.py": 103, "test_optimizers.py": 98, "test_memory_scaling.py": 78, "test_api_tools.py": 61,
    "test_megatron_lora.py": 60, "test_zero3_init.py": 54, "test_qlora.py": 52, "test_reliability.py": 46,
    "test_export_sharded.py": 42, "test_distributed_preference.py": 38, "test_sft_token_losses.py": 28,
    "test_megatron_parallel.py": 28, "test_webui_browser.py": 90,
}  # fmt: skip
SLOW_TEST = 8.0
ALONE = "test_parity_table.py"
TOGETHER = ("test_ray.py",)


def _weight(path: Path, slow: bool) -> float:
    if slow and path.name in SLOW_SECONDS:
        return SLOW_SECONDS[path.name]
    text = path.read_text(encoding="utf-8")
    tests = len(re.findall(r"^def test_", text, flags=re.M))
    marked = tests if re.search(r"^pytestmark = .*mark\.slow", text, flags=re.M) else text.count("@pytest.mark.slow")
    return marked * SLOW_TEST if slow else float(tests - marked)


def deal(files: list[Path], slow: bool) -> list[list[Path]]:
    """Two lists of files with about equal seconds; TOGETHER in one of them."""
    together = [f for f in files if f.name in TOGETHER]
    items = [together] if together else []
    items += [[f] for f in files if f.name not in TOGETHER]
    items.sort(key=lambda group: -sum(_weight(f, slow) for f in group))
    shards: list[list[Path]] = [[], []]
    for group in items:
        lighter = min(shards, key=lambda shard: sum(_weight(f, slow) for f in shard))
        lighter.extend(group)
    return shards


def _pytest(argv: list[str], files: list[Path], number: int, log) -> tuple[subprocess.Popen, str]:
    base = tempfile.mkdtemp(prefix=f"lf-dist-tests-{number}-")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={base}", *argv]
    proc = subprocess.Popen(cmd + [str(f) for f in files], stdout=log, stderr=subprocess.STDOUT if log else None)
    return proc, base


def main(argv: list[str]) -> int:
    marker = argv[argv.index("-m") + 1] if "-m" in argv else ""
    slow = marker.startswith("slow")
    files = sorted(TESTS.glob("test_*.py"))
    runs = []  # (exit code, basetemp)
    alone = [f for f in files if f.name == ALONE and slow]
    if alone:
        proc, base = _pytest(argv, alone, 2, None)
        runs.append((proc.wait(), base))
    logs, started = [], []
    for number, shard in enumerate(deal([f for f in files if f not in alone], slow)):
        log = None if number == 0 else tempfile.TemporaryFile()
        started.append(_pytest(argv, shard, number, log))
        logs.append(log)
    runs += [(proc.wait(), base) for proc, base in started]
    for number, log in enumerate(logs[1:], start=1):
        log.seek(0)
        sys.stdout.write(f"\n=== shard {number} ===\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
    codes = [0 if code == 5 else code for code, _ in runs]  # 5: pytest selected no test in that run
    for (_, base), code in zip(runs, codes):
        if code == 0:  # a failed run keeps its folders to look into
            shutil.rmtree(base, ignore_errors=True)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
