"""Tables against the paper's numbers, training-curve plots, and the paper data file."""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from sidcore.report import paper, plot, tabulate

PAPER_CSV = Path(paper.DATA_FILE)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(required=True)
    tabulate.register(subparsers)
    plot.register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def write_summary(directory: Path, table: str, method: str, alpha: float | None, *,
                  fid: tuple[float, float], nfe: int = 1, kimg: float | None = 512.0,
                  size: str | None = None, **metrics: tuple[float, float]) -> Path:
    summary = {"dataset": table, "table": table, "method": method, "alpha": alpha, "nfe": nfe,
               "kimg": kimg, "runs": 10, "num_images": 5000, "detector": "sidcore-digits",
               "std_ddof": 1,
               "metrics": {name: {"mean": mean, "std": std, "values": [mean] * 10}
                           for name, (mean, std) in {"fid": fid, **metrics}.items()}}
    if size is not None:
        summary["size"] = size
    name = "_".join(str(part) for part in (table, method, alpha, size) if part is not None)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(summary))
    return path


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


def test_cifar10_uncond_table_has_every_paper_row_and_our_delta(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "cifar10-uncond", "sid", 1.2, fid=(1.950, 0.020),
                         kimg=204800.0, **{"is": (9.95, 0.04)})
    out = tmp_path / "cifar10-uncond.csv"
    run_cli("tabulate", "--table", "cifar10-uncond", "--summaries", str(path), "--out", str(out))
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected_paper_rows = paper_row_count("cifar10-uncond")
    assert expected_paper_rows == 22
    assert len(table) == expected_paper_rows + 1
    assert list(table["status"][:expected_paper_rows]) == ["paper only"] * expected_paper_rows
    ours = table.iloc[-1]
    assert ours["status"] == "ours + paper"
    assert ours["FID (ours)"] == "1.950 ± 0.020"
    assert ours["FID (paper)"] == "1.923 ± 0.017"
    assert ours["ΔFID"] == "+0.027"
    assert ours["IS (paper)"] == "9.980 ± 0.042"
    assert ours["images seen (Mimg)"] == "204.8"
    markdown = out.with_suffix(".md").read_text()
    assert "| model | method | alpha | NFE |" in markdown
    assert "FID (paper)" in markdown and "ΔFID" in markdown


def test_tabulate_accepts_no_summaries(tmp_path: Path) -> None:
    out = tmp_path / "ffhq64.csv"
    run_cli("tabulate", "--table", "ffhq64", "--summaries", "--out", str(out))
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(table) == paper_row_count("ffhq64")
    assert "1.040 ± 0.011" in set(table["FID (paper)"])


def test_imagenet64_table_has_precision_and_recall(tmp_path: Path) -> None:
    summaries = [
        json.loads(write_summary(tmp_path, "imagenet64", "sid2a", 1.2, fid=(1.12, 0.02),
                                 precision=(0.7512, 0.004), recall=(0.6234, 0.003)).read_text()),
        json.loads(write_summary(tmp_path, "imagenet64", "teacher", None, fid=(2.60, 0.03),
                                 nfe=79, kimg=None).read_text()),
    ]
    table = tabulate.tabulate("imagenet64", summaries)
    for column in ("Precision (ours)", "Precision (paper)", "Recall (ours)", "Recall (paper)"):
        assert column in table.columns
    teacher, ours = table.iloc[-2], table.iloc[-1]
    assert ours["Precision (ours)"] == "0.75 ± 0.00"
    assert ours["Recall (paper)"] == "0.62"
    assert ours["ΔFID"] == "+0.010"
    # Two teacher rows in the paper; the NFE picks the 79-step one.
    assert teacher["FID (paper)"] == "2.640" and teacher["status"] == "ours + paper"


def test_edm2_rows_match_by_size_and_feed_the_fd_dinov2_table(tmp_path: Path) -> None:
    summaries = [json.loads(write_summary(tmp_path, "edm2", "sida", 1.0, fid=(1.80, 0.02),
                                          size="s", fd_dinov2=(70.0, 0.4)).read_text())]
    fid_table = tabulate.tabulate("edm2", summaries)
    ours = fid_table.iloc[-1]
    assert (ours["size"], ours["CFG"], ours["FID (paper)"]) == ("s", "N", "1.756 ± 0.023")
    dino = tabulate.tabulate("edm2_fd_dinov2", summaries).iloc[-1]
    assert dino["FD_DINOv2 (paper)"] == "68.760 ± 0.450"
    assert dino["ΔFD_DINOv2"] == "+1.240"


def test_summary_for_another_table_is_rejected_by_name(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "cifar10-cond", "sid", 1.2, fid=(1.7, 0.01))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        run_cli("tabulate", "--table", "cifar10-uncond", "--summaries", str(path),
                "--out", str(tmp_path / "t.csv"))
    assert not (tmp_path / "t.csv").exists()


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
    assert run_cli("plot", "--log", f"SiD α=1.2={sid}", "--log", f"SiDA α=1.0={sida}",
                   "--teacher-summary", str(teacher), "--paper-fid", "SiD α=1.2 (paper)=1.923",
                   "--title", "tiny", "--out", str(out)) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert plot.split_pair("SiD α=1.2=a/b.jsonl") == ("SiD α=1.2", "a/b.jsonl")


def test_plot_rejects_log_without_fid(tmp_path: Path) -> None:
    good = write_log(tmp_path / "good.jsonl", {10.0: 5.0})
    bad = write_log(tmp_path / "bad.jsonl", {10.0: None, 20.0: None})
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        run_cli("plot", "--log", f"a={good}", "--log", f"b={bad}",
                "--out", str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


def test_paper_csv_values_are_numeric_and_keys_unique() -> None:
    with PAPER_CSV.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows
    for row in rows:
        float(row["mean"])
        for column in ("alpha", "nfe", "std"):
            if row[column]:
                float(row[column])
        assert row["metric"] in {"fid", "is", "precision", "recall", "fd_dinov2"}
        assert row["method"] in {"", "teacher", "sid", "sida", "sid2a"}
    keys = [tuple(row[c] for c in ("table", "model", "alpha", "size", "cfg", "nfe", "metric"))
            for row in rows]
    assert len(keys) == len(set(keys))
    assert {row["table"] for row in rows} == {"cifar10-uncond", "cifar10-cond", "imagenet64",
                                              "ffhq64", "afhq64-v2", "edm2", "edm2_fd_dinov2"}


@pytest.mark.parametrize("table, mean", [("cifar10-uncond", "1.499"), ("cifar10-cond", "1.396"),
                                         ("imagenet64", "1.110"), ("ffhq64", "1.040")])
def test_paper_csv_holds_the_best_sid2a_numbers(table: str, mean: str) -> None:
    frame = paper.select(table)
    best = frame[(frame["method"] == "sid2a") & (frame["metric"] == "fid")]
    assert float(mean) in set(best["mean"])
    assert best["mean"].min() == float(mean)
