"""Locate (or build) the separate venv that holds LLaMA-Factory from PyPI, the reference for parity tests.

LLaMA-Factory pins older transformers / datasets / trl than lf-dist, so it lives in its own venv
(`.venv-lf`, made by `make test` via `python tests/reference/lf_venv.py --create`) from the pins of
`locks/llamafactory.txt`, torch's CPU build first. On a CPU-only torch two
fix-ups make it import: drop the CUDA-only torchvision build, and move torchaudio's compiled libraries aside
(LLaMA-Factory imports torchaudio's Python part at module level).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-lf"
LOG = VENV.with_name(".venv-lf-install.log")
LOCK = ROOT / "locks" / "llamafactory.txt"
TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def python_path() -> Path:
    env = os.environ.get("LF_REFERENCE_PYTHON")
    if env:
        return Path(env)
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ready() -> tuple[bool, str]:
    """Whether the reference venv imports LLaMA-Factory, and if not, why."""
    py = python_path()
    if not py.is_file():
        reason = f"no LLaMA-Factory reference venv at {py.parent.parent}"
        if LOG.is_file():
            tail = LOG.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            reason += f" (install failed: {tail[0] if tail else 'see ' + str(LOG)})"
        return False, reason
    probe = subprocess.run([str(py), "-c", "import llamafactory.data"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return False, f"llamafactory does not import in {py}: {probe.stderr.strip().splitlines()[-1:]}"
    return True, ""


def create() -> int:
    """Build .venv-lf; on failure leave the log for the skip message and return 0 (tests skip, not fail)."""
    with open(LOG, "w", encoding="utf-8") as log:

        def run(*cmd):
            log.write("$ " + " ".join(map(str, cmd)) + "\n")
            log.flush()
            return subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, check=False).returncode

        if run(sys.executable, "-m", "venv", VENV) != 0:
            return 0
        pip = [python_path(), "-m", "pip", "install", "-q"]
        run(*pip, "pip==26.3")
        torch_ok = run(*pip, TORCH + "+cpu") == 0 or run(*pip, "--extra-index-url", CPU_INDEX, TORCH + "+cpu") == 0
        if not torch_ok or run(*pip, "-r", LOCK) != 0:
            log.write("pip install of llamafactory failed\n")
            return 0
        run(python_path(), "-m", "pip", "uninstall", "-y", "-q", "torchvision")
        site = subprocess.run(
            [str(python_path()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        for lib in Path(site, "torchaudio").rglob("*.so"):
            lib.rename(lib.with_name(lib.name + ".disabled"))
        ok, why = ready()
        log.write("ready\n" if ok else f"not ready: {why}\n")
    return 0


if __name__ == "__main__":
    if "--create" in sys.argv:
        ok, _ = ready()
        sys.exit(0 if ok else create())
    ok, why = ready()
    print("ready" if ok else why)
