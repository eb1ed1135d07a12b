"""``sidcore benchmark``: one row per layout, method and engine, each measured in a process of its own."""
import json
from pathlib import Path

import pytest

from sidcore import benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_rows_of_an_iteration_and_of_evaluation_for_eager_and_a_lever(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the benchmark reads the repository's config.yaml
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
