"""The tabulate and plot rules on fixture run outputs, then `snakemake --report`.

Fixture evaluation summaries (every configured model, the teachers that are evaluated, the released
generators) and distillation logs stand in for the GPU stages. Snakemake 9.27 already takes such a file as
it is although its own inputs (run*.json, generator.pt) are missing: it has no job record that could call
for a rerun, and no input to be older than. `--allowed-rules tabulate plot` makes that explicit: with the
rules that write them disallowed they are source files, so only tables and plots can run (asserted from
the job counts).
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PAPER_CSV = ROOT / "sidcore" / "data" / "paper_results.csv"
PAPER_TABLES = {"cifar10-uncond", "cifar10-cond", "imagenet64", "ffhq64", "afhq64-v2", "edm2", "edm2_fd_dinov2"}
FED_BY = {"edm2_fd_dinov2": "edm2"}  # a table made from another table's summaries
METRIC_COLUMNS = {"fid": "FID", "is": "IS", "precision": "Precision", "recall": "Recall", "fd_dinov2": "FD_DINOv2"}
OVERLAY = "evaluation: {released: true}\n"


def fixture_models(config: dict) -> list[dict]:
    """Identity of every model whose summary a table reads: teachers, our runs, released generators."""
    models = []
    for dataset, d in config["datasets"].items():
        common = {"dataset": dataset, "table": d["table"], "size": d.get("size")}
        if "teacher_eval" in d:
            models.append({**common, "method": "teacher", "alpha": None, "source": "ours",
                           "dir": f"results/{dataset}/teacher", "nfe": 2 * d["teacher_eval"]["num_steps"] - 1})
        for method, spec in d["methods"].items():
            for alpha in map(float, spec["alphas"]):
                models.append({**common, "method": method, "alpha": alpha, "source": "ours",
                               "dir": f"results/{dataset}/{method}/alpha{alpha}", "nfe": 1})
        for method, keys in d.get("released", {}).items():
            for alpha, key in keys.items():
                models.append({**common, "method": method, "alpha": float(alpha), "source": "released",
                               "key": key, "dir": f"results/{dataset}/released/{method}/alpha{float(alpha)}",
                               "nfe": 1})
    return models


def write_fixtures(work: Path, config: dict) -> list[dict]:
    """Write a summary.json per model and a log.jsonl per distillation run; return the summaries."""
    summaries = []
    for number, model in enumerate(fixture_models(config)):
        d = config["datasets"][model["dataset"]]
        runs, num_images = config["evaluation"]["runs"], d.get("evaluation", {}).get(
            "num_images", config["evaluation"]["num_images"])
        base = {"fid": 1.0, "is": 9.0, "precision": 0.6, "recall": 0.5, "fd_dinov2": 50.0}
        summary = {
            "dataset": model["dataset"], "table": model["table"], "size": model["size"], "method": model["method"],
            "alpha": model["alpha"], "source": model["source"], "released_key": model.get("key"),
            "nfe": model["nfe"], "kimg": None if model["method"] == "teacher" else 1000.0 * (number + 1),
            "runs": runs, "num_images": num_images, "detector": d["detector"]["name"], "std_ddof": 1,
            "seeds": list(range(runs)),
            "metrics": {name: {"mean": base[name] + 0.0123 * number, "std": 0.01, "values": []}
                        for name in d["metrics"]}}
        path = work / model["dir"] / "eval" / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary))
        summaries.append(summary)
        if model["source"] == "ours" and model["method"] != "teacher":
            log = [{"tick": tick, "kimg": kimg, "fid": 100.0 / (1 + kimg) + summary["metrics"]["fid"]["mean"]}
                   for tick, kimg in enumerate((0.0, 10.0, 100.0, 1000.0))]
            log.insert(2, {"tick": 2, "kimg": 50.0})  # a tick without evaluation
            (work / model["dir"] / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    return summaries


def paper_keys(table: str) -> dict[tuple, list[dict]]:
    """The paper's rows of ``table`` by (method, α, size), from the data file itself."""
    rows: dict[tuple, list[dict]] = {}
    with PAPER_CSV.open(newline="") as stream:
        for row in csv.DictReader(stream):
            if row["table"] == table and row["method"]:
                key = (row["method"], float(row["alpha"]) if row["alpha"] else None, row["size"])
                rows.setdefault(key, []).append(row)
    return rows


def paper_row_count(table: str) -> int:
    with PAPER_CSV.open(newline="") as stream:
        return len({tuple(row[c] for c in ("model", "method", "alpha", "size", "cfg", "nfe"))
                    for row in csv.DictReader(stream) if row["table"] == table})


def job_counts(out: str) -> Counter:
    counts = Counter()
    for line in out.split("Job stats:")[-1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def mean_of(cell: str) -> float:
    return float(cell.split("±")[0])


def check_table(work: Path, table: str, summaries: list[dict]) -> None:
    rows = list(csv.DictReader((work / f"results/tables/{table}.csv").open(newline="")))
    fed_by = FED_BY.get(table, table)
    mine = [s for s in summaries if s["table"] == fed_by]
    metric = "fd_dinov2" if table == "edm2_fd_dinov2" else "fid"
    ours_col = f"{METRIC_COLUMNS[metric]} (ours)"
    if table not in PAPER_TABLES:
        assert not any("(paper)" in column for column in rows[0])
        assert len(rows) == len(mine) and {row["status"] for row in rows} == {"ours"}
        return
    paper_col, delta_col = f"{METRIC_COLUMNS[metric]} (paper)", f"Δ{METRIC_COLUMNS[metric]}"
    paper_rows = [row for row in rows if row["status"] in ("paper only", "ours + paper")]
    assert len(paper_rows) == paper_row_count(table), table
    keys = paper_keys(table)
    for summary in mine:
        alpha = "" if summary["alpha"] is None else f"{summary['alpha']:.1f}"
        released = summary["source"] == "released"
        found = [row for row in rows if (row["method"], row["alpha"], row.get("size", "")) == (
                 summary["method"], alpha, summary["size"] or "") and (row["status"] == "released") == released
                 and row[ours_col]]
        assert len(found) == 1, (table, summary["method"], alpha, summary["size"], released)
        row = found[0]
        assert row[ours_col] == f"{summary['metrics'][metric]['mean']:.3f} ± 0.010"
        published = [p for p in keys.get((summary["method"], summary["alpha"], summary["size"] or ""), [])
                     if p["metric"] == metric]
        if released:
            assert row["model"].endswith("(released)") and row["status"] == "released"
        else:
            assert row["status"] == ("ours + paper" if published else "ours"), row
        if published:
            assert mean_of(row[paper_col]) == pytest.approx(float(published[0]["mean"]))
            assert float(row[delta_col]) == pytest.approx(mean_of(row[ours_col]) - mean_of(row[paper_col]),
                                                          abs=1.5e-3)
        else:
            assert row[paper_col] == row[delta_col] == ""
    markdown = (work / f"results/tables/{table}.md").read_text()
    assert "| model | family | method | alpha |" in markdown and f"| {paper_col} | {delta_col} |" in markdown
    assert "sample standard deviation (ddof = 1) over 10 runs of 50,000 images each" in markdown
    assert f"detector {mine[0]['detector']}" in markdown


@pytest.mark.slow
def test_tables_plots_and_report_from_fixture_outputs(tmp_path: Path) -> None:
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("workflow", "envs", "profiles"):
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / "released.yaml").write_text(OVERLAY)
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    summaries = write_fixtures(tmp_path, config)
    tables = sorted({d["table"] for d in config["datasets"].values()} | set(FED_BY))
    assert PAPER_TABLES | {"tiny"} <= set(tables)
    targets = [f"results/tables/{t}.csv" for t in tables] + [f"results/plots/{d}.png" for d in config["datasets"]]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `sidcore`
    # Targets first: --allowed-rules takes every word after it.
    command = [*SNAKEMAKE, *targets, "--cores", "2", "--configfile", "released.yaml"]
    allowed = ["--allowed-rules", "tabulate", "plot"]
    r = subprocess.run([*command, *allowed], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert job_counts(out) == {"tabulate": len(tables), "plot": len(config["datasets"])}, out[-4000:]

    for table in tables:
        check_table(tmp_path, table, summaries)
    for dataset in config["datasets"]:
        png, pdf = tmp_path / f"results/plots/{dataset}.png", tmp_path / f"results/plots/{dataset}.pdf"
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 300
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")

    r = subprocess.run([*command, "--report", "report.html", *allowed], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    html = (tmp_path / "report.html").read_text()
    for target in targets:
        assert target in html and target.replace(".png", ".pdf").replace(".csv", ".md") in html
    assert '"Tables": {"' in html and '"FID against images seen": {"' in html  # the report's categories
    assert "<td>1.923 " in html  # a paper value: the table is rendered in its caption
