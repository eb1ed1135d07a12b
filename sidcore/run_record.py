"""What a distillation run directory records about its start, and what a new start does with an earlier run.

``settings.json`` (written when a run starts from image 0) holds the settings the run was started with, the
sha256 of the networks it starts from (teacher, SiD²A's init) and the id of the plan that asked for the start.
The plan reads it to name, before any job, the runs whose settings changed; the job reads it to decide,
explicitly, between continuing the run and starting over:

- a start-over id (``--start-over``: the plan of a forced rerun) that differs from the record's starts the
  run over; a requeued or relaunched job of the same plan carries the same id and continues;
- a teacher or init that is not the one the run started from (Snakemake reruns a job whose input was
  remade) starts it over;
- changed settings stop the job, naming each change, unless the plan chose to start such runs over.

Starting over never deletes: the earlier run directory is renamed beside it (``keep_aside``). Torch-free.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from sidcore import atomic
from sidcore.errors import UserError
from sidcore.settings import plain

RECORD_FILE = "settings.json"
STATE_FILE = "training-state.pt"
GENERATOR_FILE = "generator.pt"
SETTINGS = ("dataset", "method", "alpha", "init", "network", "distill", "resolution", "channels", "label_dim")
RECORDING_ONLY = ("engine", "eval_raw_generator")  # distill settings that leave the computed weights as they are
ON_CHANGE = ("stop", "start-over")  # a run started with other settings: config on_changed_settings
UNSET = object()


def training_settings(settings: dict) -> dict:
    """The settings a resumed run must share with the run that started it (as stored: through JSON). How the
    networks execute and what is measured besides are not among them: a run may resume with other
    ``RECORDING_ONLY`` settings."""
    kept = plain({k: settings[k] for k in SETTINGS})
    for key in RECORDING_ONLY:
        kept["distill"].pop(key, None)
    return json.loads(json.dumps(kept, sort_keys=True))


def changes(old: object, new: object, key: str = "") -> list[str]:
    """``key old -> new`` for every value that differs between two nested settings, keys as dotted paths."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for k in sorted(set(old) | set(new))
                for change in changes(old.get(k, UNSET), new.get(k, UNSET), f"{key}.{k}" if key else k)]
    if old == new:
        return []
    old, new = ("(unset)" if v is UNSET else json.dumps(v) for v in (old, new))
    return [f"{key} {old} -> {new}"]


def read(outdir: Path) -> dict | None:
    """The record of the run in ``outdir``; None if it has none (not started, or started by an earlier sidcore)."""
    path = Path(outdir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable run record ({e}); put back a good copy or move the run away") from None
    if not isinstance(record, dict) or not {"settings", "inputs", "start"} <= set(record):
        raise UserError(f"{path}: not a run record (settings, inputs, start); "
                        "put back a good copy or move the run away")
    return record


def write(outdir: Path, settings: dict, inputs: dict, start: str | None) -> None:
    atomic.write_text(Path(outdir) / RECORD_FILE, json.dumps(
        {"settings": training_settings(settings), "inputs": inputs, "start": start,
         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1, sort_keys=True) + "\n")


def settings_changes(outdir: Path, settings: dict) -> list[str]:
    """What differs between the settings the run in ``outdir`` was started with and ``settings``; empty if it
    has no training state to continue (or no record). Read by the plan, before any job."""
    record = read(outdir)
    if record is None or not (Path(outdir) / STATE_FILE).exists():
        return []
    return changes(record["settings"], training_settings(settings))


def decide(outdir: Path, record: dict | None, settings: dict, inputs: dict, start: str | None,
           on_change: str) -> str | None:
    """Why the run in ``outdir`` (whose record is ``record``) must start over, keeping the earlier run aside, or
    None to continue it (or to start a run the directory does not hold yet). ``inputs``: the sha256 of the
    networks the run starts from; ``start``: the plan's start-over id, if it forces the run; ``on_change``: one
    of ``ON_CHANGE``."""
    outdir = Path(outdir)
    state, generator = (outdir / STATE_FILE).exists(), (outdir / GENERATOR_FILE).exists()
    if not (state or generator):
        return None
    if start is not None and (record is None or record["start"] != start):
        return "forced"
    if not state:
        return "no-state"  # a published generator without the state it came from: it cannot be continued
    if record is None:
        return None  # a state of an earlier sidcore: the resume checks its settings
    changed_inputs = [name for name in sorted(set(inputs) | set(record["inputs"]))
                      if inputs.get(name) != record["inputs"].get(name)]
    if changed_inputs:
        return "-".join(changed_inputs) + "-changed"
    changed = changes(record["settings"], training_settings(settings))
    if not changed:
        return None
    if on_change == "start-over":
        return short_form(record["settings"], changed)
    raise UserError(f"{outdir}: the run was started with other settings: {', '.join(changed)}; restore them, or "
                    "start it over with the earlier run kept aside (config on_changed_settings: start-over)")


def short_form(old: dict, changed: list[str], limit: int = 60) -> str:
    """The changed settings' earlier values as a name: ``glr=0.0001`` (or ``3-settings`` if too long)."""
    parts = []
    for change in changed:
        key = change.split(" ", 1)[0]
        value: object = old
        for part in key.split("."):
            value = value.get(part, "unset") if isinstance(value, dict) else "unset"
        parts.append(f"{key.rsplit('.', 1)[-1]}={json.dumps(value)}")
    name = re.sub(r"[^A-Za-z0-9._=+-]", "", "-".join(parts))
    return name if 0 < len(name) <= limit else f"{len(changed)}-settings"


def keep_aside(outdir: Path, why: str) -> Path:
    """Rename the run directory ``outdir`` to ``<name>.kept-<UTC time>-<why>`` beside it; the new name."""
    outdir = Path(outdir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = outdir.with_name(f"{outdir.name}.kept-{stamp}-{why}")
    n = 2
    while aside.exists():
        aside = outdir.with_name(f"{outdir.name}.kept-{stamp}-{why}-{n}")
        n += 1
    outdir.rename(aside)
    outdir.mkdir()
    return aside
