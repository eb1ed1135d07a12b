"""``sidcore benchmark``: one row per layout, method and engine, each measured in a process of its own."""
import json
import os
from pathlib import Path

import pytest

from sidcore import benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_rows_of_an_iteration_and_of_evaluation_for_eager_and_a_lever(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the benchmark reads the repository's config.yaml
    monkeypatch.setattr(benchmark, "load_warning", lambda: None)  # a busy machine adds its warning lines
    lines = []
    rows = benchmark.run(["tiny"], ["sid"], ["eager", "fused_adam", "fused_attention"], 1, str(tmp_path / "rows.json"),
                         profiles=str(tmp_path / "profiles"), log=lines.append)
    assert [(r["kind"], r["engine"]) for r in rows] == [
        ("iteration", "eager"), ("evaluation", "eager"), ("iteration", "fused_adam"),  # Adam's lever: no evaluation
        ("iteration", "fused_attention"), ("evaluation", "fused_attention")]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows and len(lines) == len(rows)
    for r in rows:
        assert r["peak_mem_mb"] > 0 and r["device"] == "cpu"
        if r["kind"] == "iteration":
            assert r["batch"] == 64 and r["sec_per_kimg"] == pytest.approx(r["iteration_sec"] / 64 * 1000)
            assert r["first_iteration_sec"] > 0 and r["fake_score_passes_sec"] > 0 and r["generator_passes_sec"] > 0
            assert r["overhead_share"] < 1
            assert "convolution" in (tmp_path / "profiles" / f"tiny-sid-{r['engine']}.txt").read_text()
        else:
            assert r["batch"] == 500 and r["images_per_sec"] > 0 and r["detector"]


def test_a_busy_machine_is_said_before_each_timing(monkeypatch):
    row = {"layout": "tiny", "method": "sid", "engine": "eager", "device": "cpu", "batch": 64, "kind": "iteration",
           "sec_per_kimg": 1.0, "iteration_sec": 0.064, "first_iteration_sec": 1.0, "fake_score_passes_sec": 0.01,
           "generator_passes_sec": 0.01, "overhead_share": 0.1, "peak_mem_mb": 1.0}
    monkeypatch.setattr(benchmark, "_child", lambda args: row)
    cores = len(os.sched_getaffinity(0))
    lines = []
    monkeypatch.setattr(benchmark.os, "getloadavg", lambda: (cores + 2.0, 0.0, 0.0))
    benchmark.run(["tiny"], ["sid"], ["eager"], 1, None, evaluation=False, log=lines.append)
    assert lines[0] == (f"warning: load average {cores + 2.0:.1f} on {cores} cores: other work shares them, so the "
                        "next timing is of a busy machine; compare timings taken at the same load only")
    assert len(lines) == 2
    lines.clear()
    monkeypatch.setattr(benchmark.os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
    benchmark.run(["tiny"], ["sid"], ["eager"], 1, None, evaluation=False, log=lines.append)
    assert len(lines) == 1 and not lines[0].startswith("warning")
