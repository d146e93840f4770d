"""What torchrun starts on every rank: `python -m lf_dist.launchers.entry train cfg.yaml [overrides]`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lf_dist.errors import UserError


def main(argv: list[str]) -> int:
    from lf_dist.configure import load_config
    from lf_dist.planner import Plan
    from lf_dist.worker import run

    _, config_path, *overrides = argv
    try:
        plan_file = os.environ.get("LF_DIST_PLAN")
        run(load_config(config_path, overrides), Plan.load(Path(plan_file)) if plan_file else None)
    except UserError as err:
        error_file = os.environ.get("LF_DIST_ERROR_FILE")
        if error_file:  # the launcher prints it once; the first rank to fail writes it
            if not Path(error_file).exists():
                record = {"message": str(err), "exit_code": err.exit_code, "label": err.label}
                Path(error_file).write_text(json.dumps(record), encoding="utf-8")
        elif os.environ.get("RANK", "0") == "0":
            print(f"lf-dist: {err.label}: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
