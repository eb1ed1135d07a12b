"""The α ablation, the cost table, the sample figures and the claims: what each reads and decides."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from configured import job

from sidcore import checkpoint, cli
from sidcore.dataset import write_image_zip
from sidcore.networks import build_network
from sidcore.report import ablation, claims, figure
from sidcore.settings import for_stage

TINY_NET = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=0, dropout=0.0)


def run_cli(*argv: str) -> int:
    """Run a report command; its Markdown (and the ablation's PDF) go beside ``--out`` / ``--plot``."""
    out = Path(argv[argv.index("--out") + 1])
    extra = ["--markdown", str(out.with_suffix(".md"))]
    if argv[0] == "ablation":
        extra += ["--pdf", str(Path(argv[argv.index("--plot") + 1]).with_suffix(".pdf"))]
    args = cli.parser().parse_args([*argv, *extra])
    return args.func(args)


def write_log(path: Path, points: list[tuple[float, float | None]], **fields) -> Path:
    """A log.jsonl with one tick per (kimg, fid) and the fields a cost row reads."""
    records = [{"kimg": kimg, "tick": tick, "stage": 2, "sec_per_kimg": 2.0 + tick, "peak_mem_mb": 512.0 * (tick + 1),
                "device": "cpu", "processes": 2, "batch_gpu": 32, **({} if fid is None else {"fid": fid, "is": 9.0}),
                **fields} for tick, (kimg, fid) in enumerate(points)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_summary(path: Path, mean: float, std: float, nfe: int = 1) -> Path:
    path.write_text(json.dumps({"nfe": nfe, "metrics": {"fid": {"mean": mean, "std": std}}}))
    return path


# ---------------------------------------------------------------------------------------------- ablation
def test_ablation_tabulates_each_run_at_its_last_evaluation_and_plots_fid_and_is(tmp_path: Path) -> None:
    logs = {a: write_log(tmp_path / f"{a}.jsonl", [(0.064, 100.0), (2.0, 30.0 * a + 5), (4.0, f)])
            for a, f in ((0.0, 20.0), (1.0, 8.0), (1.5, float("nan")))}
    out, plot = tmp_path / "t" / "ablation.csv", tmp_path / "p" / "ablation.png"
    argv = [x for a, log in logs.items() for x in ("--run", "sida", str(a), str(log))]
    assert run_cli("ablation", *argv, "--run", "sid2a", "1.0", str(logs[1.0]), "--title", "t",
                   "--out", str(out), "--plot", str(plot)) == 0
    frame = pd.read_csv(out)
    assert list(frame["method"]) == ["SiDA", "SiDA", "SiDA", "SiD²A"]
    assert list(frame["alpha"]) == [0.0, 1.0, 1.5, 1.0]
    assert list(frame["final FID"][:2]) == [20.0, 8.0] and math.isnan(frame["final FID"][2])
    assert list(frame["best FID"][:2]) == [5.0, 8.0] and list(frame["best at images"][:2]) == [2000, 4000]
    assert list(frame["status"][:3]) == ["finite", "finite", "diverged (non-finite FID)"]
    assert "prints no values" in out.with_suffix(".md").read_text()
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.with_suffix(".pdf").exists()
    runs = ablation.load_runs([("sida", 1.0, logs[1.0]), ("sid2a", 1.0, logs[1.0])])
    fig = ablation.figure(runs, "t")
    assert [ax.get_title() for ax in fig.axes] == ["SiDA: FID", "SiDA: IS", "SiD²A: FID", "SiD²A: IS"]


def test_ablation_refuses_a_log_without_fid(tmp_path: Path) -> None:
    log = write_log(tmp_path / "x.jsonl", [(2.0, None)])
    with pytest.raises(ValueError, match="no in-training fid"):
        ablation.load_runs([("sida", 1.0, log)])


# ---------------------------------------------------------------------------------------------- cost
def test_cost_reads_speed_memory_and_wall_time_and_puts_table_8_beside(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", [(0.064, 50.0), (10.0, None), (20.0, None), (30.0, 9.0)])
    bench = tmp_path / "bench.tsv"
    bench.write_text("s\th:m:s\tmax_rss\n7200.0\t2:00:00\t100\n")
    out = tmp_path / "cost.csv"
    assert run_cli("cost", "--run", "cifar10-uncond", "cifar10-uncond", "sid2a", "1.2", str(log), str(bench),
                   "--run", "tiny", "tiny", "sid", "1.0", str(log), str(bench), "--out", str(out)) == 0
    rows = pd.read_csv(out, keep_default_na=False).to_dict("records")
    # Ticks after the first run at 3, 4 and 5 s/kimg: the median is 4; 10M images take 4e4 s.
    assert rows[0]["s / 1k images"] == 4.0 and rows[0]["hours per 10M images"] == round(4e4 / 3600, 2)
    assert rows[0]["peak memory per GPU (GB)"] == 2.0 and rows[0]["job wall time (h)"] == 2.0
    assert (rows[0]["GPUs"], rows[0]["batch per GPU"], rows[0]["device"]) == (2, 32, "cpu")
    # SiD²A is set beside Table 8's SiDA column; tiny has no paper column.
    assert (rows[0]["paper: hardware"], rows[0]["paper: s / 1k images"], rows[0]["paper: memory per GPU (GB)"],
            rows[0]["paper: batch per GPU"]) == ("8×V100", "3.6", "13.0", "32")  # columns with blanks read as text
    assert rows[1]["paper: hardware"] == "" and rows[1]["paper: s / 1k images"] == ""


def test_cost_names_a_log_without_the_fields_it_needs(tmp_path: Path) -> None:
    log = tmp_path / "old.jsonl"
    log.write_text(json.dumps({"kimg": 1.0, "tick": 0, "sec_per_kimg": 1.0}) + "\n")
    bench = tmp_path / "b.tsv"
    bench.write_text("s\n1.0\n")
    with pytest.raises(ValueError, match=f"{log}: tick records lack 'device'"):
        run_cli("cost", "--run", "tiny", "tiny", "sid", "1.0", str(log), str(bench), "--out",
                str(tmp_path / "c.csv"))
    assert not (tmp_path / "c.csv").exists()


# ---------------------------------------------------------------------------------------------- claims
def power_law(images: list[float], slope: float, scale: float = 1000.0) -> list[tuple[float, float]]:
    return [(0.064, 120.0)] + [(n / 1000, scale * n ** slope) for n in images]


def claims_setup(tmp_path: Path, sida_curve, sida_mean, sid2a_means, ablation_finals):
    """Logs and summaries of one experiment; returns the ``claims`` inputs."""
    grid = [2000, 4000, 8000, 16000, 32000, 64000]
    teacher = {"nfe": 35, "mean": 5.0, "std": 0.3}
    sid = [claims.load_run("sid", "1.2", str(write_log(tmp_path / "sid.jsonl", power_law(grid, -0.5))),
                           str(write_summary(tmp_path / "sid.json", 5.2, 0.25)))]
    sida = claims.load_run("sida", "1.0", str(write_log(tmp_path / "sida.jsonl", sida_curve)),
                           str(write_summary(tmp_path / "sida.json", sida_mean, 0.2)))
    sid2a = [claims.load_run("sid2a", str(a), str(write_log(tmp_path / f"sid2a{a}.jsonl", [(2.0, 5.0), (4.0, 4.0)])),
                             str(write_summary(tmp_path / f"sid2a{a}.json", m, 0.2))) for a, m in sid2a_means.items()]
    abl = [claims.load_run("sida", str(a), str(write_log(tmp_path / f"abl{a}.jsonl", [(2.0, 30.0), (8.0, f)])), None)
           for a, f in ablation_finals.items()]
    return teacher, sid, sida, sid2a, sid[0], abl


def test_claims_hold_when_the_numbers_say_so(tmp_path: Path) -> None:
    sida_curve = [(0.064, 120.0), (2.0, 10.0), (4.0, 4.5), (8.0, 4.0)]
    rows, extra = claims.evaluate_claims(*claims_setup(tmp_path, sida_curve, 4.6, {1.0: 4.5, 1.2: 4.7},
                                                       {0.0: 9.0, 1.0: 6.0, 1.5: float("nan")}))
    assert [r["held"] for r in rows] == [True] * 5
    assert extra["fit"]["slope"] == pytest.approx(-0.5) and extra["fit"]["r2"] == pytest.approx(1.0)
    assert extra["fit"]["points"] == 6  # tick 0 is left out
    assert "2.0× fewer" not in rows[2]["measured"] and "fewer" in rows[2]["measured"]


def test_claims_fail_on_the_criteria_stated(tmp_path: Path) -> None:
    # SiDA never reaches F*; one SiD²A α is within a std of its start; α = 0 ends lowest in the ablation.
    sida_curve = [(0.064, 120.0), (2.0, 60.0), (64.0, 40.0)]
    rows, _ = claims.evaluate_claims(*claims_setup(tmp_path, sida_curve, 4.6, {1.0: 4.5, 1.2: 5.1},
                                                   {0.0: 5.0, 1.0: 6.0}))
    held = {r["claim"]: r["held"] for r in rows}
    assert held == {"a": True, "b": True, "c": False, "d": False, "e": False}
    assert "SiDA, α = 1.0 never" in rows[2]["measured"]
    # Too few evaluations to fit: (a) is untestable, not failed.
    teacher, sid, *rest = claims_setup(tmp_path, sida_curve, 4.6, {1.0: 4.5}, {1.0: 6.0})
    sid[0].images, sid[0].fids, sid[0].ticks = sid[0].images[:3], [120.0, 30.0, 20.0], [0, 1, 2]
    rows, extra = claims.evaluate_claims(teacher, sid, *rest)
    assert rows[0]["held"] is None and "too few to fit" in rows[0]["measured"] and extra["fit"] is None
    claims.figure(teacher, sid, rest[0], rest[1], rest[2], extra, "t")  # draws without the fit
    # SiD 2 stds above the teacher: (b) fails; a curve that bends up before its minimum fails (a).
    teacher, sid, *rest = claims_setup(tmp_path, sida_curve, 4.6, {1.0: 4.5}, {1.0: 6.0})
    sid[0].mean = 5.0 + 2 * 0.3 + 0.01
    sid[0].fids = [120.0, 30.0, 60.0, 10.0, 50.0, 40.0, 3.0]
    rows, _ = claims.evaluate_claims(teacher, sid, *rest)
    assert [r["held"] for r in rows[:2]] == [False, False]


def test_claims_command_writes_table_and_plot(tmp_path: Path) -> None:
    grid = [2000, 4000, 8000, 16000]
    args = ["--teacher-summary", str(write_summary(tmp_path / "t.json", 5.0, 0.3, nfe=35)), "--sid2a-init-alpha", "1.2"]
    for method, alpha, points in (("sid", "1.2", power_law(grid, -0.5)), ("sida", "1.0", power_law(grid, -0.7)),
                                  ("sid2a", "1.0", power_law(grid, -0.6))):
        log = write_log(tmp_path / f"{method}.jsonl", points)
        args += ["--run", method, alpha, str(log), str(write_summary(tmp_path / f"{method}.json", 5.0, 0.1))]
    args += ["--ablation", "1.0", str(tmp_path / "sida.jsonl")]
    out = tmp_path / "claims" / "x.csv"
    assert run_cli("claims", *args, "--out", str(out), "--plot", str(out.with_suffix(".png"))) == 0
    frame = pd.read_csv(out)
    assert list(frame["claim"]) == list("abcde") and set(frame["held"]) <= {"held", "not held"}
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="need SiDA at α 1.0, the SiD run SiD²A starts from"):
        run_cli("claims", *args[:4], *args[4:], "--sid2a-init-alpha", "1.0", "--out", str(out),
                "--plot", str(out.with_suffix(".png")))


# ---------------------------------------------------------------------------------------------- figures
def test_figure_draws_generator_and_teacher_from_the_same_latents_and_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_zip = tmp_path / "data.zip"
    rng = np.random.default_rng(0)
    write_image_zip(tiny_zip, rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8), np.arange(20) % 10)
    paths = {}
    for name in ("generator", "teacher"):
        net = build_network(**TINY_NET)
        paths[name] = tmp_path / f"{name}.pt"
        sampling = {"init_sigma": 2.5} if name == "generator" else {}  # the generator says how to sample it
        checkpoint.save_atomic(checkpoint.network_snapshot(net, TINY_NET, **sampling), paths[name])
    settings = for_stage(job("tiny", "sid", 1.2, teacher_eval={"num_steps": 2}), "figure")
    device = torch.device("cpu")
    panels = figure.grids(settings, str(paths["generator"]), str(paths["teacher"]), str(tiny_zip), None, 7, 2, 3,
                          device)
    assert [name for name, _ in panels] == ["SiD, α = 1.2, 1 step (ours)", "Teacher, 3 NFE"]
    assert panels[0][1].shape == (2 * 10, 3 * 10, 1)  # 8×8 images with a 1-pixel border
    again = figure.grids(settings, str(paths["generator"]), None, str(tiny_zip), None, 7, 2, 3, device)
    assert len(again) == 1 and (again[0][1] == panels[0][1]).all()  # fixed seeds: the same grid
    other = figure.grids(settings, str(paths["generator"]), None, str(tiny_zip), None, 8, 2, 3, device)
    assert not (other[0][1] == panels[0][1]).all()
    out = tmp_path / "f.png"
    fig = figure.figure(panels, "t")
    figure.save_atomic(fig, out)
    assert out.read_bytes().startswith(b"\x89PNG")
