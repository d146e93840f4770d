"""What torchrun starts on every rank: `python -m lf_dist.launchers.entry train cfg.yaml [overrides]`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lf_dist.errors import UserError


def main(argv: list[str]) -> int:
    from lf_dist.log import quiet_libraries
    from lf_dist.planner import Plan
    from lf_dist.run_checks import load_config
    from lf_dist.worker import run

    quiet_libraries()
    _, config_path, *overrides = argv
    try:
        plan_file = os.environ.get("LF_DIST_PLAN")
        run(load_config(config_path, overrides), Plan.load(Path(plan_file)) if plan_file else None)
    except UserError as err:
        error_file = os.environ.get("LF_DIST_ERROR_FILE")
        if error_file:  # the launcher prints it once; the first rank to fail writes it
            record = {"message": str(err), "exit_code": err.exit_code, "label": err.label}
            try:  # created exclusively: ranks that fail at the same moment (a preemption) never mix their lines
                fd = os.open(error_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(record))
        elif os.environ.get("RANK", "0") == "0":
            print(f"lf-dist: {err.label}: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    from lf_dist import startup

    startup.pause()  # until the libraries are imported (see lf_dist/startup.py)
    startup.end_process(main(sys.argv[1:]))  # a rank ends as the console script does: no interpreter teardown
