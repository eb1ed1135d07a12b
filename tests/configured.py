"""Job settings for tests, built as the workflow builds them: config.yaml's, resolved for a dataset, method and
alpha (``sidcore.settings.resolve``), with the test's changes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sidcore import config
from sidcore.settings import resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIG = config.load(ROOT / "config.yaml", ROOT / config.SCHEMA)


def job(name: str, method: str | None = None, alpha: float | None = None, *, distill: dict | None = None,
        evaluation: dict | None = None, **changes) -> dict:
    """Dataset ``name``'s settings (of ``method`` at ``alpha``) with ``distill`` / ``evaluation`` keys and
    top-level keys changed."""
    s = resolve(CONFIG, name, method, alpha)
    if distill:
        s["distill"] = replace(s["distill"], **{k: tuple(v) if isinstance(v, list) else v for k, v in distill.items()})
    if evaluation:
        s["evaluation"] = replace(s["evaluation"], **evaluation)
    return {**s, **changes}


def without_compile(settings: dict) -> dict:
    """``settings`` with their configured execution levers but compilation (minutes per run on a CPU;
    tests/test_engine.py covers it)."""
    d = settings["distill"]
    return {**settings, "distill": replace(d, engine=replace(d.engine, compile=False))}
