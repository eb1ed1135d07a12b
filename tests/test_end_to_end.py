"""The whole tiny experiment through Snakemake and the real sidcore commands, shortened."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHORT = """
evaluation: {runs: 3}
datasets:
  tiny:
    teacher: {train: {kimg: 8}}
    teacher_eval: {num_steps: 4}
    detector: {epochs: 3}
    evaluation: {num_images: 256, batch: 256}
    distill: {duration_kimg: 0.768, tick_kimg: 0.192, stage_kimg: [0.192, 0.384], snap_ticks: 2,
              eval_early_ticks: [0], dump_ticks: 2, eval_images: 128}
    methods: {sid2a: {distill: {duration_kimg: 0.768, stage_kimg: [0.192, 0.384]}}}
    ablation: {alphas: [0.0, 1.0], distill: {duration_kimg: 0.384, stage_kimg: [0.096, 0.192]}}
"""
STUDIES = ("results/plots/alpha-ablation-tiny.png", "results/tables/cost.csv", "results/claims/tiny.csv")


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path):
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("workflow", "envs"):  # envs/: the rules' software (their `conda:`)
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / "short.yaml").write_text(SHORT)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `sidcore`
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "short.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    with open(tmp_path / "results/tables/tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["method"], row["alpha"]) for row in rows] == [
        ("teacher", ""), ("sid", "1.0"), ("sid", "1.2"), ("sida", "1.0"), ("sid2a", "1.0"), ("sid2a", "1.2")]
    fid_col = next(c for c in rows[0] if c.startswith("FID"))
    for row in rows:
        mean, std = (float(v) for v in row[fid_col].split("±"))
        assert 0 < mean < 400 and std >= 0
    assert (tmp_path / "results/tables/tiny.md").read_text().count("\n") >= 8
    for ext in ("png", "pdf"):
        assert (tmp_path / f"results/plots/tiny.{ext}").stat().st_size > 1000

    seeds = {}
    for run_json in sorted((tmp_path / "results/tiny").glob("*/*/eval/run*.json")):
        seeds.setdefault(run_json.name, set()).add(tuple(json.loads(run_json.read_text())["seeds"]))
    assert sorted(seeds) == ["run0.json", "run1.json", "run2.json"]
    assert all(len(s) == 1 for s in seeds.values())  # every model sees the same images in run r
    assert len(set().union(*seeds.values())) == 3  # and the runs differ

    log = [json.loads(x) for x in (tmp_path / "results/tiny/sida/alpha1.0/log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log][0] == 1 and log[-1]["stage"] == 3 and "fid" in log[-1]
    summary = json.loads((tmp_path / "results/tiny/sid2a/alpha1.2/eval/summary.json").read_text())
    assert summary["runs"] == 3 and len(summary["metrics"]["fid"]["values"]) == 3
    assert (tmp_path / "logs/distill/tiny-sid2a-alpha1.2.log").read_text().count("tick") >= 4
    for row in rows[1:]:  # the default target draws every run's samples
        assert (tmp_path / f"results/figures/tiny-{row['method']}-alpha{row['alpha']}.png").stat().st_size > 1000
    assert (tmp_path / "benchmarks/distill/tiny-sid-alpha1.2.tsv").is_file()

    # The ablation, cost and claims targets through the same rules.
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *STUDIES, "--configfile", "short.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    with open(tmp_path / "results/tables/alpha-ablation-tiny.csv") as f:
        ablation = [(row["method"], row["alpha"], row["images seen"]) for row in csv.DictReader(f)]
    assert ablation == [(m, a, "384") for m in ("SiDA", "SiD²A") for a in ("0.0", "1.0")]
    assert (tmp_path / "results/plots/alpha-ablation-tiny.pdf").stat().st_size > 1000
    with open(tmp_path / "results/tables/cost.csv") as f:
        cost = list(csv.DictReader(f))
    assert sorted((row["method"], row["alpha"]) for row in cost) == [
        ("SiD", "1.0"), ("SiD", "1.2"), ("SiDA", "1.0"), ("SiD²A", "1.0"), ("SiD²A", "1.2")]
    assert all(row["device"] == "cpu" and row["GPUs"] == "2" and float(row["s / 1k images"]) > 0 and
               float(row["job wall time (h)"]) > 0 for row in cost)
    with open(tmp_path / "results/claims/tiny.csv") as f:
        verdicts = list(csv.DictReader(f))
    assert [row["claim"] for row in verdicts] == list("abcde")
    assert all(row["held"] in ("held", "not held", "untestable") for row in verdicts)
