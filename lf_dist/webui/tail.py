"""Following a run's trainer_log.jsonl: the records after the ones a page already has.

A resumed run rewrites the file from its checkpoint's step, so the file may get shorter or change under a
reader: the page says how many records it holds and the step of the last one, and gets everything again
(`reset`) when those no longer match the file.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """Every complete record (a line being written, without its newline yet, waits for the next read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.split("\n")[:-1]:
        try:
            records.append(json.loads(line, parse_constant=lambda _: None))  # NaN / inf: no JSON answer has them
        except ValueError:
            continue
    return records


def records_after(path: Path, have: int, last_step: int | None) -> dict:
    """{"reset": whether the page must drop what it has, "records": what it lacks, "count": records in all}."""
    records = read_records(path)
    still = 0 < have <= len(records) and records[have - 1].get("current_steps") == last_step
    if have == 0 or still:
        return {"reset": False, "records": records[have:], "count": len(records)}
    return {"reset": True, "records": records, "count": len(records)}
