"""Tables against the paper's numbers, training-curve plots, and the paper data file."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from sidcore import cli
from sidcore.report import paper, plot, tabulate

PAPER_CSV = Path(paper.DATA_FILE)


def run_cli(*argv: str) -> int:
    """Run a report command; its outputs besides ``--out`` go beside it (errors propagate)."""
    out = Path(argv[argv.index("--out") + 1])
    extra = ["--markdown" if argv[0] == "tabulate" else "--pdf",
             str(out.with_suffix(".md" if argv[0] == "tabulate" else ".pdf"))]
    args = cli.parser().parse_args([*argv, *extra])
    return args.func(args)


def write_summary(directory: Path, table: str, method: str, alpha: float | None, *,
                  fid: tuple[float, float], nfe: int = 1, kimg: float | None = 512.0,
                  size: str | None = None, source: str = "ours", std_ddof: int = 1,
                  **metrics: tuple[float, float]) -> Path:
    summary = {"dataset": table, "table": table, "method": method, "alpha": alpha, "nfe": nfe,
               "kimg": kimg, "runs": 10, "num_images": 5000, "detector": "sidcore-digits",
               "std_ddof": std_ddof, "source": source,
               "metrics": {name: {"mean": mean, "std": std, "values": [mean] * 10}
                           for name, (mean, std) in {"fid": fid, **metrics}.items()}}
    if size is not None:
        summary["size"] = size
    name = "_".join(str(part) for part in (table, method, alpha, size, source) if part is not None)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(summary))
    return path


def read_summary(path: Path) -> dict:
    return json.loads(path.read_text())


def paper_row_count(table: str) -> int:
    with PAPER_CSV.open(newline="") as stream:
        return len({(row["model"], row["family"], row["method"], row["alpha"], row["size"],
                     row["cfg"], row["nfe"])
                    for row in csv.DictReader(stream) if row["table"] == table})


def test_tiny_table_lists_teacher_first_with_formatted_values(tmp_path: Path) -> None:
    paths = [
        write_summary(tmp_path, "tiny", "sida", 1.0, fid=(1.5, 0.01), **{"is": (9.0, 0.1)}),
        write_summary(tmp_path, "tiny", "sid", 1.2, fid=(1.2344, 0.0123), **{"is": (9.1, 0.05)}),
        write_summary(tmp_path, "tiny", "teacher", None, fid=(0.9, 0.02), nfe=35, kimg=None),
        write_summary(tmp_path, "tiny", "sid", 1.0, fid=(1.4, float("nan"))),
    ]
    out = tmp_path / "tables" / "tiny.csv"
    assert run_cli("tabulate", "--table", "tiny", "--summaries", *map(str, paths),
                   "--out", str(out)) == 0
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(table["method"]) == ["teacher", "sid", "sid", "sida"]
    assert list(table["alpha"]) == ["", "1.0", "1.2", "1.0"]
    assert set(table["status"]) == {"ours"}
    teacher, sid12 = table.iloc[0], table.iloc[2]
    assert teacher["NFE"] == "35" and teacher["images seen (Mimg)"] == ""
    assert sid12["FID (ours)"] == "1.234 ± 0.012"
    assert sid12["IS (ours)"] == "9.100 ± 0.050"
    assert sid12["images seen (Mimg)"] == "0.512" and sid12["runs"] == "10"
    assert table.iloc[1]["IS (ours)"] == ""  # metric absent from that summary
    assert table.iloc[1]["FID (ours)"] == "1.400"  # a single run has no std


def test_a_sid2a_row_counts_its_start_s_images_and_says_how_many(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "tiny", "sid2a", 1.0, fid=(1.1, 0.01), kimg=4.032)
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "start_kimg": 20.032}))
    out = tmp_path / "tiny.csv"
    assert run_cli("tabulate", "--table", "tiny", "--summaries", str(path), "--out", str(out)) == 0
    row = pd.read_csv(out, dtype=str, keep_default_na=False).iloc[0]
    assert row["images seen (Mimg)"] == "0.024 (start 0.02)"


def test_a_sid2a_curve_starts_where_its_start_ended(tmp_path: Path) -> None:
    log = write_log(tmp_path / "sid2a.jsonl", {0.064: 20.0, 2.112: 5.0})
    records = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "start_kimg": 20.032}) + "\n" for r in records))
    fig = plot.figure([("sid2a", 1.0, log)], None, "tiny", "", "")
    [curve] = [line for line in fig.axes[0].get_lines() if "in-training" in line.get_label()]
    assert list(curve.get_xdata()) == [20096.0, 22144.0]
    assert curve.get_label() == "SiD²A, α = 1.0: in-training FID, from its start at 20,032 images"


def test_cifar10_uncond_table_has_every_paper_row_and_our_delta(tmp_path: Path) -> None:
    paths = [write_summary(tmp_path, "cifar10-uncond", "sid", 1.2, fid=(1.950, 0.020),
                           kimg=204800.0, **{"is": (9.95, 0.04)}),
             write_summary(tmp_path, "cifar10-uncond", "sid", 1.2, fid=(1.930, 0.010), kimg=None,
                           source="released"),
             write_summary(tmp_path, "cifar10-uncond", "sid", 1.5, fid=(2.5, 0.03))]
    out = tmp_path / "cifar10-uncond.csv"
    run_cli("tabulate", "--table", "cifar10-uncond", "--summaries", *map(str, paths), "--out", str(out))
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected_paper_rows = paper_row_count("cifar10-uncond")
    assert expected_paper_rows == 22
    # Our α = 1.2 run is the paper's row; the released generator and the new α add a row each.
    assert len(table) == expected_paper_rows + 2
    paper_rows = table[table["status"].isin(["paper only", "ours + paper"])]
    assert len(paper_rows) == expected_paper_rows
    assert list(table["status"]).count("ours + paper") == 1
    merged = table.index[table["status"] == "ours + paper"][0]
    ours, released, new = table.iloc[merged], table.iloc[merged + 1], table.iloc[-1]
    assert (ours["model"], ours["family"], ours["method"], ours["alpha"]) == ("SiD, α = 1.2", "One step", "sid", "1.2")
    assert ours["FID (ours)"] == "1.950 ± 0.020"
    assert ours["FID (paper)"] == "1.923 ± 0.017"
    assert ours["ΔFID"] == "+0.027"
    assert ours["IS (paper)"] == "9.980 ± 0.042" and ours["ΔIS"] == "-0.030"
    assert ours["images seen (Mimg)"] == "204.8" and ours["paper source"] == "SiDA paper Table 1"
    assert (released["model"], released["status"]) == ("SiD, α = 1.2 (released)", "released")
    assert (released["FID (paper)"], released["ΔFID"]) == ("1.923 ± 0.017", "+0.007")
    assert released["IS (ours)"] == released["ΔIS"] == "" and released["IS (paper)"] == "9.980 ± 0.042"
    assert (new["model"], new["family"], new["status"]) == ("SiD, α = 1.5", "One step", "ours")
    assert new["FID (paper)"] == new["ΔFID"] == new["paper source"] == ""
    teacher = table.iloc[0]
    assert (teacher["model"], teacher["status"], teacher["FID (paper)"]) == (
        "VP-EDM (Karras et al., 2022)", "paper only", "1.97")
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# CIFAR-10 32×32, unconditional (cifar10-uncond)\n")
    assert "| model | family | method | alpha | NFE |" in markdown
    assert "FID (paper)" in markdown and "ΔFID" in markdown
    assert ("Ours: mean ± sample standard deviation (ddof = 1) over 10 runs of 5,000 images each, "
            "detector sidcore-digits.") in markdown
    assert "Δ = ours − paper" in markdown and "*released*:" in markdown


def test_markdown_states_each_std_convention(tmp_path: Path) -> None:
    summaries = [read_summary(write_summary(tmp_path, "tiny", "sid", 1.0, fid=(1.4, 0.1), std_ddof=0)),
                 read_summary(write_summary(tmp_path, "tiny", "sida", 1.0, fid=(1.3, 0.1)))]
    markdown = "\n".join(tabulate.notes(summaries, with_paper=False))
    assert "Ours (SiD, α = 1.0): mean ± population standard deviation (ddof = 0) over 10 runs" in markdown
    assert "Ours (SiDA, α = 1.0): mean ± sample standard deviation (ddof = 1) over 10 runs" in markdown
    assert "Paper:" not in markdown  # no paper rows in the tiny table


def test_tabulate_accepts_no_summaries(tmp_path: Path) -> None:
    out = tmp_path / "ffhq64.csv"
    run_cli("tabulate", "--table", "ffhq64", "--summaries", "--out", str(out))
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(table) == paper_row_count("ffhq64")
    assert set(table["status"]) == {"paper only"}
    assert "1.040 ± 0.011" in set(table["FID (paper)"])
    assert "Ours" not in out.with_suffix(".md").read_text()


def test_imagenet64_table_has_precision_and_recall(tmp_path: Path) -> None:
    summaries = [
        read_summary(write_summary(tmp_path, "imagenet64", "sid2a", 1.2, fid=(1.12, 0.02),
                                   precision=(0.7512, 0.004), recall=(0.6234, 0.003))),
        read_summary(write_summary(tmp_path, "imagenet64", "teacher", None, fid=(2.60, 0.03),
                                   nfe=79, kimg=None)),
    ]
    table = tabulate.tabulate("imagenet64", summaries)
    assert len(table) == paper_row_count("imagenet64")
    for column in ("Precision (ours)", "Precision (paper)", "Recall (ours)", "Recall (paper)"):
        assert column in table.columns
    merged = table[table["status"] == "ours + paper"]
    teacher, ours = merged.iloc[0], merged.iloc[1]
    assert ours["Precision (ours)"] == "0.75 ± 0.00"
    assert ours["Recall (paper)"] == "0.62" and ours["ΔRecall"] == "+0.00"
    assert ours["ΔFID"] == "+0.010"
    # Two teacher rows in the paper; the NFE picks the 79-step one.
    assert (teacher["NFE"], teacher["FID (paper)"], teacher["FID (ours)"]) == ("79", "2.64", "2.600 ± 0.030")
    assert table[table["NFE"] == "511"].iloc[0]["status"] == "paper only"


def test_teacher_at_another_nfe_is_not_the_papers_row(tmp_path: Path) -> None:
    summary = read_summary(write_summary(tmp_path, "ffhq64", "teacher", None, fid=(2.5, 0.02), nfe=35))
    table = tabulate.tabulate("ffhq64", [summary])
    assert len(table) == paper_row_count("ffhq64") + 1
    assert table.iloc[0]["status"] == "paper only"  # the paper's 79-NFE teacher
    assert (table.iloc[-1]["model"], table.iloc[-1]["status"], table.iloc[-1]["FID (paper)"]) == (
        "Teacher", "ours", "")


def test_edm2_rows_match_by_size_and_feed_the_fd_dinov2_table(tmp_path: Path) -> None:
    summaries = [read_summary(write_summary(tmp_path, "edm2", "sida", 1.0, fid=(1.80, 0.02),
                                            size="s", fd_dinov2=(70.0, 0.4)))]
    fid_table = tabulate.tabulate("edm2", summaries)
    assert len(fid_table) == paper_row_count("edm2")
    ours = fid_table[fid_table["status"] == "ours + paper"].iloc[0]
    assert (ours["size"], ours["CFG"], ours["FID (paper)"]) == ("s", "N", "1.756 ± 0.023")
    dino_table = tabulate.tabulate("edm2_fd_dinov2", summaries)
    dino = dino_table[dino_table["status"] == "ours + paper"].iloc[0]
    assert (dino["size"], dino["FD_DINOv2 (paper)"]) == ("s", "68.76 ± 0.45")
    assert dino["ΔFD_DINOv2"] == "+1.240"


def test_summary_for_another_table_is_rejected_by_name(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "cifar10-cond", "sid", 1.2, fid=(1.7, 0.01))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        run_cli("tabulate", "--table", "cifar10-uncond", "--summaries", str(path),
                "--out", str(tmp_path / "t.csv"))
    assert not (tmp_path / "t.csv").exists()


def test_summary_of_unknown_source_is_rejected(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "tiny", "sid", 1.0, fid=(1.7, 0.01), source="theirs")
    with pytest.raises(ValueError, match="unknown source 'theirs'"):
        tabulate.load_summaries([path], "tiny")


def write_log(path: Path, fids: dict[float, float | None]) -> Path:
    lines = [{"kimg": kimg, "tick": tick, "stage": "train", "sec_per_kimg": 0.5,
              "loss_G": 0.1, "loss_fake_score": 0.2, **({} if fid is None else {"fid": fid})}
             for tick, (kimg, fid) in enumerate(fids.items())]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_plot_writes_png_and_pdf(tmp_path: Path) -> None:
    sid = write_log(tmp_path / "sid.jsonl", {0.0: 300.0, 10.0: 50.0, 20.0: None, 40.0: 12.0})
    sida = write_log(tmp_path / "sida.jsonl", {10.0: 20.0, 40.0: 5.0, 80.0: 2.5})
    teacher = write_summary(tmp_path, "tiny", "teacher", None, fid=(3.0, 0.1), nfe=35, kimg=None)
    out = tmp_path / "plots" / "tiny.png"
    assert run_cli("plot", "--run", "sid", "1.2", str(sid), "--run", "sida", "1.0", str(sida),
                   "--teacher-summary", str(teacher), "--table", "tiny", "--title", "tiny",
                   "--out", str(out)) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


def legend(fig) -> list[str]:
    return [text.get_text() for text in fig.axes[0].get_legend().get_texts()]


def test_plot_draws_the_papers_lines_of_its_table_and_size(tmp_path: Path) -> None:
    log = write_log(tmp_path / "sid2a.jsonl", {10.0: 20.0, 40.0: 5.0})
    labels = legend(plot.figure([("sid2a", 1.0, log)], None, "edm2", "xs", "edm2-xs"))
    assert labels == ["SiD²A, α = 1.0: in-training FID", "Teacher, 63 NFE (paper): 3.53", "SiD, α = 1.0 (paper): 3.353",
                      "SiDA, α = 1.0 (paper): 2.228", "SiD²A, α = 1.0 (paper): 2.156"]
    fig = plot.figure([("sid2a", 1.0, log)], None, "edm2", "xs", "edm2-xs")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    curve, final = lines["SiD²A, α = 1.0: in-training FID"], lines["SiD²A, α = 1.0 (paper): 2.156"]
    assert curve.get_color() == final.get_color() and final.get_linestyle() == ":"
    assert list(final.get_ydata()) == [2.156, 2.156]
    # Both of the paper's ImageNet teachers; our own teacher replaces them.
    assert [label for label in legend(plot.figure([("sid", 1.2, log)], None, "imagenet64", "", ""))
            if label.startswith("Teacher")] == ["Teacher, 511 NFE (paper): 1.36", "Teacher, 79 NFE (paper): 2.64"]
    teacher = write_summary(tmp_path, "imagenet64", "teacher", None, fid=(2.5, 0.1), nfe=79, kimg=None)
    assert [label for label in legend(plot.figure([("sid", 1.2, log)], teacher, "imagenet64", "", ""))
            if label.startswith("Teacher")] == ["Teacher, 79 NFE (ours, mean of 10 × 5,000 images): 2.500"]


def test_coinciding_curves_stay_visible(tmp_path: Path) -> None:
    """Runs with the same FIDs (the demo's SiD α = 1.0 and 1.2) differ in marker, size and line style."""
    log = write_log(tmp_path / "sid.jsonl", {10.0: 20.0, 40.0: 5.0})
    fig = plot.figure([("sid", 1.0, log), ("sid", 1.2, log)], None, "tiny", "", "")
    a, b = [line for line in fig.axes[0].get_lines() if line.get_label().endswith("in-training FID")]
    assert a.get_marker() != b.get_marker() and a.get_markersize() > b.get_markersize()
    assert a.get_linestyle() != b.get_linestyle() and a.get_fillstyle() == b.get_fillstyle() == "none"


def test_plot_rejects_log_without_fid_and_bad_runs(tmp_path: Path) -> None:
    good = write_log(tmp_path / "good.jsonl", {10.0: 5.0})
    bad = write_log(tmp_path / "bad.jsonl", {10.0: None, 20.0: None})
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        run_cli("plot", "--run", "sid", "1.0", str(good), "--run", "sida", "1.0", str(bad),
                "--table", "tiny", "--out", str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(ValueError, match="method must be one of"):
        plot.parse_run("teacher", "1.0", str(good))
    with pytest.raises(ValueError, match="α .one. is not a number"):
        plot.parse_run("sid", "one", str(good))


def test_paper_csv_values_are_numeric_and_keys_unique() -> None:
    with PAPER_CSV.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows
    for row in rows:
        float(row["mean"])
        for column in ("alpha", "nfe", "std"):
            if row[column]:
                float(row[column])
        assert row["metric"] in ({"gpus", "batch", "batch_gpu", "mem_alloc_gb", "mem_reserved_gb", "sec_per_kimg",
                                  "hours_per_10m"} if row["table"] == "cost" else
                                 {"fid", "is", "precision", "recall", "fd_dinov2"})
        assert row["method"] in {"", "teacher", "sid", "sida", "sid2a"}
    keys = [tuple(row[c] for c in ("table", "model", "method", "alpha", "size", "cfg", "nfe", "metric"))
            for row in rows]
    assert len(keys) == len(set(keys))
    assert {row["table"] for row in rows} == {"cifar10-uncond", "cifar10-cond", "imagenet64",
                                              "ffhq64", "afhq64-v2", "edm2", "edm2_fd_dinov2", "cost"}


@pytest.mark.parametrize("table, mean", [("cifar10-uncond", "1.499"), ("cifar10-cond", "1.396"),
                                         ("imagenet64", "1.110"), ("ffhq64", "1.040")])
def test_paper_csv_holds_the_best_sid2a_numbers(table: str, mean: str) -> None:
    frame = paper.select(table)
    best = frame[(frame["method"] == "sid2a") & (frame["metric"] == "fid")]
    assert float(mean) in set(best["mean"])
    assert best["mean"].min() == float(mean)
