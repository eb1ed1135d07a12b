"""GitHub-flavoured Markdown tables for the reports."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from sidcore.atomic import write_text


def line(cells: list) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def table(frame: pd.DataFrame, title: str, notes: list[str] = ()) -> str:
    """``frame`` under a heading, followed by its notes (one paragraph each)."""
    lines = [f"# {title}", "", line(list(frame.columns)), line(["---"] * len(frame.columns))]
    lines += [line(list(row)) for row in frame.itertuples(index=False)]
    for note in notes:
        lines += ["", note]
    lines.append("")
    return "\n".join(lines)


def save(frame: pd.DataFrame, csv_path: Path, md_path: Path, title: str, notes: list[str] = ()) -> None:
    """Write ``frame`` as CSV to ``csv_path`` and as a Markdown table (with ``title`` and ``notes``) to ``md_path``."""
    write_text(csv_path, frame.to_csv(index=False))
    write_text(md_path, table(frame, title, notes))
