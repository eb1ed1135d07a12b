"""The launcher and the slurm profile against a real SLURM controller on 127.0.0.1 (tests/slurm_localhost.py).

Where SLURM cannot be installed (not root, no Debian packages) these tests skip, saying so; CI installs it
(.ci/install-slurm) and sets SIDCORE_REQUIRE_SLURM=1, which turns a missing SLURM into a failure.
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from slurm_localhost import PARTITION, LocalSlurm, conflicting_conf, missing_binaries

from sidcore import checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The tiny experiment, shortened, on the test cluster: CPU rules and GPU stages both in partition debug,
# the distillation as 2 processes on 2 fake GPUs.
SHORT = f"""
cluster:
  partition: {PARTITION}
  cpu_partition: {PARTITION}
  signal_delay_s: 90
datasets:
  tiny:
    teacher: {{train: {{kimg: 8}}}}
    detector: {{epochs: 3}}
    distill: {{duration_kimg: 0.384, tick_kimg: 0.128, stage_kimg: [0.128, 0.256], snap_ticks: 1,
              eval_early_ticks: [0], dump_ticks: 1, eval_images: 128}}
    cluster:
      jobs:
        distill: {{gpus_per_node: 2, cpus_per_task: 1, mem_gb: 2, time_min: 10}}
        cpu: {{cpus_per_task: 1, mem_gb: 2, time_min: 10}}
"""
GENERATOR = "results/tiny/sid/alpha1.0/generator.pt"


@pytest.fixture(scope="session")
def slurm():
    missing = missing_binaries()
    reason = (f"SLURM is not installed here (missing {', '.join(missing)}); run .ci/install-slurm as root" if missing
              else "starting SLURM's daemons needs root" if os.geteuid() != 0 else conflicting_conf())
    if reason:
        if os.environ.get("SIDCORE_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sidcore-slurm-"))
    cluster = LocalSlurm(root, gpus=2).start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def client_env(cluster) -> dict:
    return {**cluster.env, "PATH": f"{BIN}{os.pathsep}{cluster.env['PATH']}", "OMP_NUM_THREADS": "1"}


def launch(cluster, logdir, command, *flags, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "sidcore"), "launch", "--name", "test", "--partition", PARTITION,
                             "--mem-mb", "2048", *flags, "--logdir", str(logdir), "--", *command],
                            env=client_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def job_ids(logdir) -> list[str]:
    path = Path(logdir) / "jobs.txt"
    return [line.split("\t")[0] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(what, check, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def requeued_jobs_start_at_once(cluster):
    """A requeued job waits ~2.5 min (BeginTime); start such jobs at once, as a free cluster would."""
    stop = threading.Event()

    def run():
        while not stop.wait(1.0):
            out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], env=cluster.env, capture_output=True,
                                 text=True).stdout
            for line in out.splitlines():
                job, reason = line.split(maxsplit=1)
                if reason.strip() == "BeginTime":
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env,
                                   capture_output=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.slow
def test_two_task_job_all_reduces_over_gloo_on_fake_gpus(slurm, tmp_path):
    p = launch(slurm, tmp_path / "logs", ["ddp-check", "--out", str(tmp_path / "check.json")],
               "--executor", "slurm", "--gpus-per-node", "2", "--time-min", "5")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["sum"] == 3.0
    assert [r["cuda_visible_devices"] for r in result["ranks"]] == ["0,1", "0,1"]  # the fake GPUs, bound by SLURM
    (job,) = job_ids(tmp_path / "logs")
    wait_for("accounting", lambda: slurm.job_state(job) == "COMPLETED", timeout=30)
    assert f"submitted slurm job {job}" in out


@pytest.mark.slow
def test_a_failing_job_reports_its_id_and_log_tail(slurm, tmp_path):
    p = launch(slurm, tmp_path / "logs", ["distill", "--settings", "{not json", "--teacher", "t", "--data", "d",
                                          "--refs", "r", "--detector-weights", "w", "--outdir", str(tmp_path)],
               "--executor", "slurm", "--gpus-per-node", "2", "--time-min", "5")
    out, _ = p.communicate(timeout=300)
    (job,) = job_ids(tmp_path / "logs")
    assert p.returncode == 1
    assert f"job {job} failed" in out
    assert "--settings is not valid JSON" in out  # the command's own error, from the task's log tail


@pytest.mark.slow
def test_interrupting_the_launcher_cancels_its_job(slurm, tmp_path):
    p = launch(slurm, tmp_path / "logs", ["ddp-check", "--out", str(tmp_path / "x.json")],
               "--executor", "slurm", "--gpus-per-node", "3", "--time-min", "5")  # 3 of 2 GPUs: stays pending
    wait_for("the job id", lambda: job_ids(tmp_path / "logs"))
    (job,) = job_ids(tmp_path / "logs")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert f"cancelling job {job}" in out
    wait_for("the cancellation", lambda: slurm.job_state(job) == "CANCELLED", timeout=30)


@pytest.mark.slow
def test_a_job_that_dies_without_a_result_is_reported_without_accounting(slurm, tmp_path):
    """On a cluster without accounting sacct fails, and submitit never sees a task killed before it wrote its
    result; the launcher notices the job has left the queue."""
    shim = tmp_path / "bin" / "sacct"
    shim.parent.mkdir()
    shim.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    shim.chmod(0o755)
    logdir = tmp_path / "logs"
    env = {**client_env(slurm)}
    env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    p = subprocess.Popen([str(BIN / "sidcore"), "launch", "--executor", "slurm", "--name", "lost", "--partition",
                          PARTITION, "--gpus-per-node", "2", "--time-min", "5", "--mem-mb", "2048",
                          "--lost-after-s", "5", "--logdir", str(logdir), "--", "ddp-check", "--out",
                          str(tmp_path / "x.json")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def tasks():
        out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {logdir}"], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    wait_for("the job's tasks", tasks, timeout=120)
    for pid in tasks():  # as the OOM killer would: no exception, no result file
        os.kill(pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=300)
    (job,) = job_ids(logdir)
    assert p.returncode == 1, out
    assert f"job {job} failed" in out and "left the queue 5 s ago without a result" in out
    assert not (tmp_path / "x.json").exists()


# --- the tiny experiment through `snakemake --profile slurm`, then interrupted runs of its distillation ----

@pytest.fixture(scope="module")
def workdir(slurm, tmp_path_factory):
    """A copy of the repository where `snakemake --profile slurm` has distilled tiny's SiD α=1.0."""
    work = tmp_path_factory.mktemp("slurm-work")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, work / name)
    for name in ("workflow", "envs", "profiles", "slurm"):
        shutil.copytree(ROOT / name, work / name)
    (work / "short.yaml").write_text(SHORT)
    r = subprocess.run([str(BIN / "snakemake"), "--profile", "slurm", "--configfile", "short.yaml",
                        "--slurm-init-seconds-before-status-checks", "2", GENERATOR],
                       cwd=work, env=client_env(slurm), capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return work, r.stdout + r.stderr


TICK_KIMG = 0.128
INTERRUPTED_S = 50  # compute the interrupted run needs at this machine's speed; a time-limited attempt lasts ≤ 30 s


def distill_command(work: Path, outdir: Path, kimg: float) -> list[str]:
    """The distill command of tiny's SiD α=1.0 as the workflow runs it (from its dry-run), ``kimg`` long."""
    r = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--configfile", "short.yaml", "--force", GENERATOR],
                       cwd=work, capture_output=True, text=True, check=True)
    line = next(x for x in r.stdout.splitlines() if " launch --executor" in x and " -- distill " in x)
    argv = shlex.split(line.split(" -- ", 1)[1].split(" > ", 1)[0])
    argv[argv.index("--outdir") + 1] = str(outdir)
    settings = json.loads(argv[argv.index("--settings") + 1])
    settings["distill"].update(duration_kimg=kimg, snap_ticks=10, dump_ticks=10)
    argv[argv.index("--settings") + 1] = json.dumps(settings)
    return argv


@pytest.mark.slow
def test_profile_runs_the_tiny_distillation_on_slurm(slurm, workdir):
    work, output = workdir
    assert (work / GENERATOR).stat().st_size > 0
    jobs = job_ids(work / "logs/jobs/distill-tiny-sid-1.0")
    assert len(jobs) == 1 and slurm.job_state(jobs[0]) == "COMPLETED"
    log = (work / "logs/distill/tiny-sid-alpha1.0.log").read_text()
    assert "submitted slurm job" in log and "tick 3" in log  # rank 0's progress, relayed into the rule's log
    # The CPU rules went to SLURM through Snakemake's executor; the GPU stage through the launcher.
    assert "Job 0 has been submitted with SLURM jobid" in output or "SLURM jobid" in output


@pytest.mark.slow
def test_interrupting_snakemake_cancels_the_slurm_job_of_a_gpu_stage(slurm, workdir):
    work, _ = workdir
    target = "results/tiny/sid/alpha1.2/generator.pt"
    (work / "long.yaml").write_text("datasets: {tiny: {distill: {duration_kimg: 1000}}}\n")
    p = subprocess.Popen([str(BIN / "snakemake"), "--profile", "slurm", "--configfile", "short.yaml", "long.yaml",
                          "--slurm-init-seconds-before-status-checks", "2", target], cwd=work, env=client_env(slurm),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    jobdir = work / "logs/jobs/distill-tiny-sid-1.2"
    wait_for("the distillation's SLURM job", lambda: job_ids(jobdir), timeout=300)
    (job,) = job_ids(jobdir)
    wait_for("it to run", lambda: slurm.job_state(job) == "RUNNING", timeout=120)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals Snakemake's whole process group
    try:
        wait_for("the cancellation", lambda: slurm.job_state(job) == "CANCELLED", timeout=60)
        assert f"cancelling job {job}" in (work / "logs/distill/tiny-sid-alpha1.2.log").read_text()
    finally:
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # Snakemake 9.27 with the SLURM executor may hang after Ctrl-C
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def final_weights(run: Path) -> dict:
    state = checkpoint.load(run / "training-state.pt")
    return {net: state[net] for net in ("G", "G_ema", "fake_score")}


def assert_same_weights(a: dict, b: dict) -> None:
    for net in a:
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"


def distill_locally(slurm, work: Path, out: Path, kimg: float) -> str:
    """The distillation through the launcher's local executor (2 CPU processes); returns its log."""
    p = launch(slurm, out / "logs", distill_command(work, out / "run", kimg), "--executor", "local",
               "--gpus-per-node", "2", cwd=work)
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log[-3000:]
    return log


@pytest.fixture(scope="module")
def interrupted_kimg(slurm, workdir, tmp_path_factory) -> float:
    """A length this machine needs about INTERRUPTED_S seconds of compute for, from the speed of a short run (the
    speed here varies tenfold with the load): at least 2 time-limited attempts, and not too many."""
    log = distill_locally(slurm, workdir[0], tmp_path_factory.mktemp("speed"), 10 * TICK_KIMG)
    sec_per_kimg = statistics.median(float(v) for v in re.findall(r"sec/kimg ([0-9.]+)", log)[1:])
    return TICK_KIMG * min(max(round(INTERRUPTED_S / sec_per_kimg / TICK_KIMG), 38), 200)


@pytest.fixture(scope="module")
def uninterrupted(slurm, workdir, interrupted_kimg, tmp_path_factory):
    """The same distillation, uninterrupted, through the launcher's local executor (2 CPU processes)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    distill_locally(slurm, workdir[0], out, interrupted_kimg)
    return final_weights(out / "run")


def distill_on_slurm(slurm, work: Path, tmp_path: Path, kimg: float, *flags: str, meanwhile=None) -> str:
    """Run the longer distillation as a SLURM job of 2 tasks to its end; returns the launcher's log."""
    with requeued_jobs_start_at_once(slurm):
        p = launch(slurm, tmp_path / "logs", distill_command(work, tmp_path / "run", kimg), "--executor", "slurm",
                   "--gpus-per-node", "2", *flags, cwd=work)
        if meanwhile is not None:
            meanwhile()
        log, _ = p.communicate(timeout=1200)
    assert p.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_scontrol_requeue_mid_run_resumes_to_the_same_weights(slurm, workdir, interrupted_kimg, uninterrupted,
                                                              tmp_path):
    def requeue_once_a_state_is_saved():
        wait_for("the first training state", lambda: (tmp_path / "run/training-state.pt").exists(), timeout=300)
        (job,) = job_ids(tmp_path / "logs")
        slurm.scontrol("requeue", job)

    log = distill_on_slurm(slurm, workdir[0], tmp_path, interrupted_kimg, "--time-min", "10",
                           meanwhile=requeue_once_a_state_is_saved)
    assert "SIGTERM received" in log and "exiting for requeue" in log
    assert log.count("distilling tiny sid") == 2  # started, then resumed once
    assert "from 0.0 to" in log and "from 0.0 to" not in log.split("exiting for requeue", 1)[1]
    assert_same_weights(uninterrupted, final_weights(tmp_path / "run"))


@pytest.mark.slow
def test_time_limit_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, workdir, interrupted_kimg,
                                                                        uninterrupted, tmp_path):
    # 2 minutes with SIGUSR2 90 s before the end: every attempt is stopped within its first 30 s, so the run of
    # about INTERRUPTED_S seconds takes several attempts (the requeues allowed are not the limit)
    log = distill_on_slurm(slurm, workdir[0], tmp_path, interrupted_kimg, "--time-min", "2", "--signal-delay-s",
                           "90", "--max-requeues", "30")
    assert "SIGUSR2 received" in log and "Requeued job" in log
    (job,) = job_ids(tmp_path / "logs")  # one SLURM job, requeued in place
    wait_for("accounting", lambda: slurm.job_state(job) == "COMPLETED", timeout=30)  # sacct lags the job's end
    assert_same_weights(uninterrupted, final_weights(tmp_path / "run"))


def test_a_link_left_by_an_interrupted_run_is_recognised_and_a_real_configuration_is_not(tmp_path):
    from slurm_localhost import CLUSTER, _left_over
    old = tmp_path / "old" / "slurm.conf"
    old.parent.mkdir()
    old.write_text(f"ClusterName={CLUSTER}\nSlurmctldPort=1\n")
    real = tmp_path / "real.conf"
    real.write_text("ClusterName=production\n")
    for name, target, left in (("to-old", old, True), ("dangling", tmp_path / "gone.conf", True),
                               ("to-real", real, False)):
        (tmp_path / name).symlink_to(target)
        assert _left_over(tmp_path / name) is left, name
    assert not _left_over(real)
