"""A distillation's progress log (``log.jsonl``: one JSON record per tick) as the reports read it."""
from __future__ import annotations

import json
from pathlib import Path

from sidcore.errors import UserError

TICK_KEYS = ("tick", "kimg")  # what every record of a progress log has


def read_log(path: str | Path) -> list[dict]:
    """The tick records of ``path``, in order."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path}, line {number}: not a JSON record") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), (int, float)) for k in TICK_KEYS):
                raise UserError(f"{path}, line {number}: not a tick record (it needs {' and '.join(TICK_KEYS)})")
            records.append(record)
    if not records:
        raise UserError(f"{path}: no tick records")
    return records


def evaluated(records: list[dict], metric: str, where: str) -> list[dict]:
    """The records that carry an in-training ``metric`` (at images seen > 0)."""
    out = [record for record in records if record.get(metric) is not None and record["kimg"] > 0]
    if not out:
        raise UserError(f"{where}: no in-training {metric} values (at images seen > 0)")
    return out


def curve(records: list[dict], metric: str, where: str) -> tuple[list[float], list[float]]:
    """Images seen and in-training ``metric`` of every record that carries it (images seen > 0)."""
    points = evaluated(records, metric, where)
    return [r["kimg"] * 1000 for r in points], [float(r[metric]) for r in points]
