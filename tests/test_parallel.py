"""Multi-process distillation (gloo on CPU), accumulation, kill -9 at any moment, and the requeue signal."""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distill import make_toy

from sidcore import REQUEUE_EXIT, checkpoint

WORKER = Path(__file__).parent / "distill_worker.py"
ITERATIONS = 5  # reaches SiDA's third stage (stage_kimg 0.016, 0.032 at 16 images per iteration)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(toy, out, method, batch_gpu, what, world_size=1, extra=(), augment=0.0) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world_size > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(toy), str(out), method, str(batch_gpu),
                                       str(augment), str(what), *map(str, extra)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs) -> list[int]:
    codes = []
    for p in procs:
        output, _ = p.communicate(timeout=600)
        codes.append(p.returncode)
        assert p.returncode in (0, REQUEUE_EXIT), output[-3000:]
    return codes


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item() for k in a if a[k].is_floating_point())


AUGMENT = 0.5  # EDM's augmentation with every transform firing often (the papers use 0.12 and 0.15)


@pytest.mark.slow
@pytest.mark.parametrize("method, augment", [("sid", AUGMENT), ("sida", AUGMENT), ("sida", 0.0)])
def test_two_gloo_processes_equal_one_process(toy, tmp_path, method, augment):
    """Global batch 16: 2 processes × 8 (DDP) = 1 process × 2 accumulated micro-batches of 8, after 5 iterations."""
    for name, world in (("1x2x8", 1), ("2x1x8", 2)):
        finish(launch(toy, tmp_path / name, method, 8, ITERATIONS, world_size=world, augment=augment))
    ref, ddp = (checkpoint.load(tmp_path / name / "weights.pt") for name in ("1x2x8", "2x1x8"))
    for net in ("G", "fake_score", "G_ema"):
        assert relative_difference(ref[net], ddp[net]) < 1e-6, net
    start = checkpoint.load_network(toy / "teacher.pt")[0].state_dict()
    assert relative_difference(start, ref["fake_score"]) > 1e-4  # the runs did train


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_large_batch(toy, tmp_path):
    """The gradients of a step from 2 micro-batches of 8 equal those from one batch of 16 (SiD; SiDA pools
    its fakeness per micro-batch by design). Parameters are not compared: Adam's first steps turn
    last-digit gradient differences of near-zero entries into steps of size lr."""
    for name, batch_gpu in (("2x8", 8), ("1x16", 16)):
        finish(launch(toy, tmp_path / name, "sid", batch_gpu, "grads"))
    a, b = (checkpoint.load(tmp_path / name / "grads.pt") for name in ("2x8", "1x16"))
    for net in ("fake_score", "G"):
        assert relative_difference(a[net], b[net]) < 1e-5, net


def final_state(out: Path) -> dict:
    return checkpoint.load(out / "training-state.pt")


def assert_identical(a: dict, b: dict) -> None:
    for net in ("G", "G_ema", "fake_score"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    assert a["cur_nimg"] == b["cur_nimg"] and a["best_fid"] == b["best_fid"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sid", "sida"])
def test_kill_9_at_random_moments_then_restart_is_bit_identical(toy, tmp_path, method):
    """With EDM's augmentation on: its draws, like all others, follow the sample positions."""
    def run(out, **kw):
        return launch(toy, out, method, 8, "run", augment=AUGMENT, **kw)

    finish(run(tmp_path / "ref"))
    reference = final_state(tmp_path / "ref")
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    # A kill in the middle of writing the third training state: the previous one must stay loadable.
    (proc,) = run(out, extra=(3,))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL and "killed during a state write" in output
    kills += 1
    assert checkpoint.load(out / "training-state.pt")["cur_nimg"] == 3 * 16  # the second state (tick 2), intact
    assert list(out.glob(".training-state.tmp*"))  # the half-written temporary file the crash left behind
    # Kills at random moments: after a random number of progress lines (ticks), mid-iteration.
    while kills < 4:
        (proc,) = run(out)
        wait_ticks = rng.randint(1, 2)
        seen = 0
        for line in proc.stdout:
            if line.startswith("tick"):
                seen += 1
                if seen == wait_ticks:
                    time.sleep(rng.uniform(0, 0.05))
                    proc.kill()
                    break
        proc.wait(timeout=600)
        if proc.returncode == 0:  # the run ended before the kill landed
            break
        assert proc.returncode == -signal.SIGKILL
        kills += 1
    if not (out / "generator.pt").exists():
        finish(run(out))
    assert kills >= 3
    assert not list(out.glob(".*.tmp*"))  # a restart clears what crashed writes left
    assert_identical(reference, final_state(out))
    assert (tmp_path / "ref" / "log.jsonl").read_text().count("\n") == (out / "log.jsonl").read_text().count("\n")


@pytest.mark.slow
def test_sigusr2_saves_and_exits_for_requeue_within_one_iteration(toy, tmp_path):
    finish(launch(toy, tmp_path / "ref", "sid", 8, "run"))
    out = tmp_path / "signalled"
    (proc,) = launch(toy, out, "sid", 8, "run")
    for line in proc.stdout:
        if line.startswith("tick 2 "):
            proc.send_signal(signal.SIGUSR2)
            break
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT, rest[-2000:]
    m = re.search(r"SIGUSR2 received at ([0-9.]+) kimg: state saved at ([0-9.]+) kimg; exiting for requeue", rest)
    assert m, rest[-2000:]
    at, saved = (round(float(v) * 1000) for v in m.groups())
    assert saved == at + 16 == final_state(out)["cur_nimg"]  # the iteration under way completes, no more
    assert finish(launch(toy, out, "sid", 8, "run")) == [0]
    assert_identical(final_state(tmp_path / "ref"), final_state(out))
