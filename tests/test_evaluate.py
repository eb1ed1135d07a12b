"""The 10-run protocol: disjoint seeds per run and rank, the same images on any number of processes, the
per-run records, resuming after a requeue, and the summary over runs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from configured import job
from test_distill import make_toy

from sidcore import REQUEUE_EXIT, checkpoint, cli, stopping
from sidcore.detectors import digits
from sidcore.download import sha256_file
from sidcore.evaluate import BLOCK_STRIDE, num_blocks, rank_seeds, run_seed
from sidcore.metrics import save_reference
from sidcore.settings import dumps, for_stage
from sidcore.summary import summarize

RUNS, NUM_IMAGES, BATCH = 3, 36, 8  # 5 blocks per run, the last one short


def test_seeds_of_runs_blocks_and_ranks_never_overlap():
    for world in (1, 2, 3, 8):
        runs = {run: rank_seeds(1000, run, 50000, 250, world) for run in range(-1, 10)}
        every = [seed for by_rank in runs.values() for seeds in by_rank.values() for seed in seeds]
        assert len(every) == len(set(every)) == 11 * 200  # in-training run −1 and runs 0…9, 200 blocks each
        for run, by_rank in runs.items():
            assert sorted(s for seeds in by_rank.values() for s in seeds) == [run_seed(1000, run, b)
                                                                            for b in range(200)]


def test_block_and_run_ranges_are_enforced():
    with pytest.raises(ValueError, match="evaluation.batch"):
        run_seed(0, 0, BLOCK_STRIDE)
    with pytest.raises(ValueError, match="evaluation.batch"):
        num_blocks(BLOCK_STRIDE * 2 + 1, 2)
    with pytest.raises(ValueError, match="run"):
        run_seed(0, -2)
    assert run_seed(0, 0, BLOCK_STRIDE - 1) < run_seed(0, 1, 0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Data, a random tiny network used as generator, a briefly trained digit detector, reference statistics."""
    root = make_toy(tmp_path_factory.mktemp("eval"))
    teacher = checkpoint.load_snapshot(root / "teacher.pt")  # a generator: the network and the σ_init it samples at
    checkpoint.save_atomic({**teacher, "meta": {"init_sigma": 2.5}}, root / "generator.pt")
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8))
    net, accuracy = digits.train_digit_classifier(images, torch.arange(64) % 10, seed=0, epochs=1)
    digits.save_digit_classifier(net, accuracy, root / "detector.pt")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 256))
    save_reference(root / "refs.npz", a.mean(0), np.cov(a, rowvar=False))
    return root


def settings(**evaluation) -> dict:
    """What an evaluation job of the tiny experiment's SiD α = 1.2 reads, with a toy budget."""
    s = job("tiny", "sid", 1.2, evaluation={"runs": RUNS, "num_images": NUM_IMAGES, "batch": BATCH, "seed": 7,
                                             **evaluation})
    return for_stage(s, "evaluate_generator")


def argv(toy: Path, outdir: Path, **evaluation) -> list[str]:
    return ["evaluate", "--settings", dumps(settings(**evaluation)), "--kind", "generator",
            "--model", str(toy / "generator.pt"), "--data", str(toy / "data.zip"), "--refs", str(toy / "refs.npz"),
            "--detector-weights", str(toy / "detector.pt"), "--outdir", str(outdir)]


def records(outdir: Path) -> list[dict]:
    return [json.loads((outdir / f"run{r}.json").read_text()) for r in range(RUNS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], world: int) -> None:
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "sidcore.cli", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_evaluate_the_same_images_as_one(toy, tmp_path):
    assert evaluate(argv(toy, tmp_path / "one")) == 0
    run_processes(argv(toy, tmp_path / "two"), world=2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["world_size"] == 1 and b["world_size"] == 2
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-9, abs=0)
        assert a["seeds"] == b["seeds"]
        ranks = b["rank_seeds"]
        assert set(ranks) == {"0", "1"} and not set(ranks["0"]) & set(ranks["1"])
        assert sorted(ranks["0"] + ranks["1"]) == b["seeds"]
    assert len({a["metrics"]["fid"] for a in one}) == RUNS  # independent runs give different values


def evaluate(args: list[str]) -> int:
    return cli.main(args)


def test_run_record_names_what_was_measured_and_the_summary_gives_mean_and_std(toy, tmp_path):
    out = tmp_path / "eval"
    assert evaluate(argv(toy, out)) == 0
    runs = records(out)
    first = runs[0]
    assert first["metric_names"] == ["fid", "is"] and set(first["metrics"]) == {"fid", "is"}
    assert first["num_images"] == NUM_IMAGES and first["detector"] == "sidcore-digits"
    assert first["model_sha256"] == sha256_file(toy / "generator.pt")
    assert first["refs_sha256"] == sha256_file(toy / "refs.npz")
    assert first["seeds"] == [run_seed(7, 0, b) for b in range(num_blocks(NUM_IMAGES, BATCH))]
    assert first["source"] == "ours" and first["released_key"] is None
    summary = summarize(runs, "toy", ddof=1)
    fids = [r["metrics"]["fid"] for r in runs]
    assert summary["metrics"]["fid"]["mean"] == pytest.approx(np.mean(fids))
    assert summary["metrics"]["fid"]["std"] == pytest.approx(np.std(fids, ddof=1))
    assert "ddof 1" in summary["std"] and summary["runs"] == RUNS
    clash = [runs[0], {**runs[1], "seeds": runs[1]["seeds"][:-1] + runs[0]["seeds"][:1]}]
    with pytest.raises(ValueError, match="share seed"):
        summarize(clash, "toy", ddof=1)


def test_a_stop_signal_keeps_finished_runs_and_the_rerun_does_the_rest(toy, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert evaluate(argv(toy, reference)) == 0
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "run0.json").write_text((reference / "run0.json").read_text())  # finished before the requeue
    stale = {**json.loads((reference / "run1.json").read_text()), "model_sha256": "another model"}
    (out / "run1.json").write_text(json.dumps(stale))
    monkeypatch.setattr(stopping, "received", lambda: 12)  # SIGUSR2 before run 1 starts
    assert evaluate(argv(toy, out)) == REQUEUE_EXIT
    monkeypatch.undo()
    assert evaluate(argv(toy, out)) == 0
    for a, b in zip(records(reference), records(out)):
        assert a == b  # run 0 kept, run 1 (stale) and run 2 computed again
