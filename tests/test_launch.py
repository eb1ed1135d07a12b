"""The launcher on this machine (submitit's local executor) and the stop-signal hand-over to commands."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sidcore import stopping
from sidcore.launch import JobSpec

BIN = Path(sys.executable).parent


def test_job_spec_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="executor 'pbs'"):
        JobSpec(executor="pbs", name="x")
    with pytest.raises(ValueError, match="one node, not 2"):
        JobSpec(executor="local", name="x", nodes=2)
    spec = JobSpec(executor="slurm", name="x", nodes=2, gpus_per_node=4, mem_mb=2048, partition="gpu", qos="high")
    params = spec.executor_parameters()
    assert params["tasks_per_node"] == 4 and params["mem_gb"] == 2 and params["slurm_partition"] == "gpu"
    assert params["slurm_qos"] == "high" and "slurm_account" not in params
    assert params["timeout_min"] == 60
    local = JobSpec(executor="local", name="x", gpus_per_node=0, time_min=60)
    assert local.tasks_per_node == 1 and local.executor_parameters()["timeout_min"] >= 60 * 24 * 365


CHILD = """
import os, signal, sys, time
from sidcore import stopping
os.kill(os.getpid(), signal.SIGUSR2)  # arrives before the command takes the signals over: stays pending
time.sleep(0.2)
stopping.watch(resumable=sys.argv[1] == "resumable")
time.sleep(0.2)
print(stopping.received())
"""


@pytest.mark.parametrize("kind", ["resumable", "other"])
def test_a_stop_signal_during_start_up_is_kept_not_fatal(kind):
    p = subprocess.run([sys.executable, "-c", CHILD, kind], preexec_fn=stopping.block, capture_output=True, text=True,
                       timeout=60)
    if kind == "resumable":  # recorded for the distillation loop
        assert p.returncode == 0 and p.stdout.strip() == str(int(signal.SIGUSR2)), p.stderr
    else:  # any other command gets the default action back once it starts
        assert p.returncode == -signal.SIGUSR2


EXITING = """
import os, signal, sys
from sidcore import cli
sys.argv = ["sidcore", "ddp-check", "--out", sys.argv[1]]
status = cli.main()
os.kill(os.getpid(), signal.SIGTERM)  # SLURM's requeue, forwarded while the command exits
sys.exit(status)
"""


def test_a_stop_signal_after_the_command_returned_leaves_its_exit_status(tmp_path):
    p = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path / "x.json")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def launch(tmp_path, *command):
    # as under Snakemake, whose rule threads count every process of the job
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    return subprocess.run([str(BIN / "sidcore"), "launch", "--executor", "local", "--name", "t", "--gpus-per-node",
                           "2", "--cpus-per-task", "1", "--logdir", str(tmp_path / "logs"), "--", *command],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_local_job_of_two_processes_all_reduces(tmp_path):
    r = launch(tmp_path, "ddp-check", "--out", str(tmp_path / "check.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["world_size"] == 2 and result["sum"] == 3.0 and result["backend"] == "gloo"
    assert "2 processes (gloo): all-reduce sum 3" in r.stdout  # rank 0's output, relayed
    assert len((tmp_path / "logs/jobs.txt").read_text().splitlines()) == 1
    # one CPU thread per process (cpus_per_task), not the caller's count: 2 × 2 threads would oversubscribe
    assert [(r["threads"], r["mkl_threads"]) for r in result["ranks"]] == [(1, "1"), (1, "1")]


@pytest.mark.slow
def test_local_job_failure_shows_the_commands_error(tmp_path):
    r = launch(tmp_path, "ddp-check")  # --out missing
    assert r.returncode == 1
    assert "failed" in r.stdout and "the following arguments are required: --out" in r.stdout


def test_the_relay_copies_rank_0s_output_and_echoes_its_narration_line_by_line(tmp_path, capsys):
    from types import SimpleNamespace

    from sidcore.launch import Relay
    out = tmp_path / "0_0_log.out"
    job = SimpleNamespace(task=lambda rank: SimpleNamespace(paths=SimpleNamespace(stdout=out)))
    echoed: list[str] = []
    relay = Relay(job, echoed.append)
    relay.flush()  # no output yet
    out.write_text("submitit INFO (2026-12-07) - Starting\ndistilling tiny sid\ntick 0  kimg 0.1")
    relay.flush()
    assert echoed == ["distilling tiny sid"]  # not submitit's bookkeeping, not the unfinished line
    with open(out, "a") as f:
        f.write("  sec/kimg 3.9\n")
    relay.flush()
    assert echoed[-1] == "tick 0  kimg 0.1  sec/kimg 3.9"
    assert capsys.readouterr().out == out.read_text()  # the launcher's log has every line
