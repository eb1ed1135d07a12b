"""Run a ``sidcore`` compute command as one submitit job of nodes × tasks-per-node processes.

This is the only module that knows about SLURM. The job is either a SLURM job (``executor: slurm``) or
local processes (submitit's local executor), so a laptop runs the same code path with gloo. Each task
exports torch.distributed's variables and runs the command in a child process; the launcher waits, relays
rank 0's output, and on failure reports the job id, its state and the tail of every task's log.

Time limits and preemption: SLURM sends SIGUSR2 ``signal_delay_s`` before the limit. Every task passes it
to its command, which finishes the iteration, saves its state and exits with ``REQUEUE_EXIT``; rank 0 then
lets submitit requeue the job (at most ``max_requeues`` time-outs), and the command resumes from its state.
A SIGTERM (``scontrol requeue``, preemption) is passed on the same way; SLURM then requeues the job itself.
Interrupting the launcher cancels the job.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from sidcore import REQUEUE_EXIT, stopping
from sidcore.errors import UserError

EXECUTORS = ("local", "slurm")
# Seconds between looks at a job's state: a local job's processes are cheap to ask about (and a short job's end
# shows at once); SLURM's controller is asked no more often than every 5 s.
POLL_S = {"local": 0.5, "slurm": 5.0}
EXITED = re.compile(r"(`sidcore [a-z-]+` exited with status \d+ on rank \d+)")  # a task's report of its command
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")  # the ones Snakemake sets
LOCAL_TIME_LIMIT_MIN = 60 * 24 * 365  # a cluster's time limit does not apply to local processes


@dataclass(frozen=True)
class JobSpec:
    """Resources of one job (config.yaml ``cluster``, merged for a dataset and stage by the workflow).
    A job of 0 GPUs per node runs one process per node."""

    executor: str
    name: str
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 1
    mem_mb: int = 8192
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_delay_s: int = 120
    max_requeues: int = 10

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise UserError(f"launch: executor {self.executor!r} is not one of {EXECUTORS} (config.yaml `launcher`)")
        if self.executor == "local" and self.nodes != 1:
            raise UserError(f"launch: the local executor runs on one node, not {self.nodes}")

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU; a CPU-only job (0 GPUs) runs one process per node."""
        return max(self.gpus_per_node, 1)

    def executor_parameters(self) -> dict:
        params = dict(name=self.name, nodes=self.nodes, tasks_per_node=self.tasks_per_node,
                      gpus_per_node=self.gpus_per_node, cpus_per_task=self.cpus_per_task, mem_gb=self.mem_mb / 1024,
                      timeout_min=self.time_min if self.executor == "slurm" else LOCAL_TIME_LIMIT_MIN)
        if self.executor == "slurm":
            params.update(slurm_signal_delay_s=self.signal_delay_s)
            params.update({f"slurm_{k}": getattr(self, k) for k in ("partition", "account", "qos")
                           if getattr(self, k)})
        return params


class StageTask(Checkpointable):
    """What every task of the job runs: ``sidcore <argv>`` in a child process, with the rank's environment."""

    def __init__(self, argv: list[str], threads: int) -> None:
        self.argv, self.threads = list(argv), threads
        self._child: subprocess.Popen | None = None
        self._status: int | None = None

    def __getstate__(self) -> dict:
        return {"argv": self.argv, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["argv"], state["threads"])

    def __call__(self) -> int:
        rank = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True).rank
        # CPU threads per process: the job's cpus_per_task, whatever the caller's environment says (Snakemake
        # sets the rule's threads, which count all the job's processes); more would oversubscribe the cores
        env = {**os.environ, **{var: str(self.threads) for var in THREAD_VARIABLES}}
        self._child = subprocess.Popen([sys.executable, "-m", "sidcore.cli", *self.argv], env=env,
                                       preexec_fn=_child_setup)
        for signum in stopping.STOP_SIGNALS:  # pass the signal on, then let submitit's handler act (rank 0 requeues)
            signal.signal(signum, self._forwarder(signal.getsignal(signum)))
        try:
            status = self._wait()
        except UncompletedJobError:  # submitit refused to requeue: the command ended as the signal came
            status = self._wait()
            if status != 0:
                raise
        if status == 0:
            for signum in stopping.STOP_SIGNALS:  # done: a late warning must not kill the exiting task
                signal.signal(signum, signal.SIG_IGN)
            return rank
        if status == REQUEUE_EXIT:
            self._await_requeue(rank)
        raise RuntimeError(f"`sidcore {' '.join(self.argv[:1])}` exited with status {status} on rank {rank}")

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission | None:
        """Rank 0 on SIGUSR2: wait until the command has saved its state; requeue if it stopped early."""
        return DelayedSubmission(StageTask(self.argv, self.threads)) if self._wait() == REQUEUE_EXIT else None

    def _forwarder(self, previous):
        def forward(signum, frame):
            if self._child is not None and self._status is None:  # not yet reaped: the pid is still the child's
                os.kill(self._child.pid, signum)
            if callable(previous):
                previous(signum, frame)
        return forward

    def _wait(self) -> int:
        """The child's exit status. Reaped here with waitpid, with the stop signals held back between the reap
        and its record, so the signal handler (which may wait too) never finds the child reaped but unrecorded."""
        while self._status is None:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, stopping.STOP_SIGNALS)
            try:
                pid, status = os.waitpid(self._child.pid, os.WNOHANG)
                if pid:
                    self._status = os.waitstatus_to_exitcode(status)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            if self._status is None:
                time.sleep(0.2)
        return self._status

    @staticmethod
    def _await_requeue(rank: int) -> None:
        """The state is saved; SLURM (or rank 0's requeue) ends this task. Writing no result keeps submitit
        waiting for the requeued job. Without SLURM nothing will requeue: fail, naming how to resume."""
        if submitit.JobEnvironment().cluster != "slurm":
            raise RuntimeError("stopped by a signal after saving its state; run the same command again to resume")
        print(f"rank {rank}: state saved; waiting for SLURM to requeue the job", flush=True)
        time.sleep(900)
        raise RuntimeError("stopped by a signal after saving its state, but SLURM did not end the job in 15 min")


def _child_setup() -> None:
    """In the command's process before exec: stop signals blocked (pending, not lost) until its main() takes
    them over; and on Linux a SIGTERM when the task dies, so no orphan keeps running (and it saves its state)."""
    stopping.block()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


class Launcher:
    """Submit one job, follow it to the end, and cancel it if the launcher is interrupted."""

    def __init__(self, spec: JobSpec, argv: list[str], folder: Path, lost_after_s: float = 120.0,
                 echo: Callable[[str], None] = lambda line: None) -> None:
        self.spec, self.argv, self.folder = spec, argv, Path(folder)
        self.poll_s = POLL_S[spec.executor]
        self.lost_after_s = lost_after_s
        self.echo = echo  # a copy of the launcher's messages and of rank 0's narration (the console)
        self.job: submitit.Job | None = None

    def run(self) -> int:
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.spec.executor,
                                         slurm_max_num_timeout=self.spec.max_requeues)
        executor.update_parameters(**self.spec.executor_parameters())
        previous = {s: signal.signal(s, self._cancel) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.job = executor.submit(StageTask(self.argv, self.spec.cpus_per_task))
            with open(self.folder / "jobs.txt", "a") as f:  # every job of this stage, newest last
                f.write(f"{self.job.job_id}\t{time.strftime('%Y-%m-%d %H:%M:%S')}\t{' '.join(self.argv[:1])}\n")
            self._say(f"submitted {self.spec.executor} job {self.job.job_id} ({self.spec.nodes} node(s) × "
                 f"{self.spec.tasks_per_node} task(s)); logs: {self.folder}/{self.job.job_id}_<task>_log.out|err")
            return self._follow()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _follow(self) -> int:
        job, relay, state, gone_since = self.job, Relay(self.job, self.echo), "", None
        while not job.done():
            relay.flush()
            if job.state != state:
                state = job.state
                self._say(f"job {job.job_id}: {state}")
            if self.spec.executor == "slurm" and not in_queue(job.job_id):
                # Ended without a result. With accounting, submitit sees that (done() above); without it,
                # only the queue tells, once the results had time to appear on a shared file system.
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > self.lost_after_s:
                    return self._failed(f"left the queue {self.lost_after_s:.0f} s ago without a result")
            else:
                gone_since = None
            time.sleep(self.poll_s)
        relay.flush()
        try:
            job.results()
        except (FailedJobError, UncompletedJobError) as e:
            exited = EXITED.search(str(e))
            return self._failed(exited.group(1) if exited else str(e).strip().splitlines()[-1] if str(e).strip()
                                else repr(e))
        self._say(f"job {job.job_id}: finished")
        return 0

    def _say(self, message: str) -> None:
        print(f"[launch] {message}", flush=True)
        self.echo(f"[launch] {message}")

    def _failed(self, reason: str) -> int:
        job = self.job
        self._say(f"job {job.job_id} failed (state {job.state}): {reason}")
        for task in range(self.spec.nodes * self.spec.tasks_per_node):
            stderr = job.task(task).paths.stderr
            self._say(f"--- task {task} stderr (last lines of {stderr}):\n" + tail(stderr, without_exit_report=True))
        return 1

    def _cancel(self, signum, frame) -> None:
        if self.job is not None and not self.job.done():
            self._say(f"{signal.Signals(signum).name}: cancelling job {self.job.job_id}")
            self.job.cancel(check=False)
        raise SystemExit(128 + signum)


class Relay:
    """Copies new lines of rank 0's output into the launcher's log, so a person can follow the run there, and
    passes its narration (not submitit's bookkeeping) to ``echo``."""

    def __init__(self, job: submitit.Job, echo: Callable[[str], None]) -> None:
        self.path, self.offset, self.echo = job.task(0).paths.stdout, 0, echo

    def flush(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end:
            text = data[:end].decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            self.offset += end
            for line in text.splitlines():
                if not line.startswith("submitit "):
                    self.echo(line)


def in_queue(job_id: str) -> bool:
    """Whether SLURM still lists the job (pending, running, requeued, completing); True if squeue fails."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if out.returncode != 0:  # also "Invalid job id" once the controller has forgotten a finished job
        return "Invalid job id" not in out.stderr
    return bool(out.stdout.strip())


def tail(path: Path, lines: int = 30, without_exit_report: bool = False) -> str:
    """The last ``lines`` of a task's log; ``without_exit_report``: without submitit's traceback of a command
    that exited with an error status (the command has said why above it)."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    if without_exit_report and text and EXITED.search(text[-1]):
        report = next((i for i, line in enumerate(text) if "Submitted job triggered an exception" in line), -1)
        text = text[:report]
    return "\n".join(text[-lines:])


def launch(spec: JobSpec, command: list[str], logdir: Path, lost_after_s: float,
           echo: Callable[[str], None] = lambda line: None) -> int:
    """Run ``command`` (a sidcore command line) as the job ``spec``; its exit status. ``echo`` gets a copy of
    each line of progress (the launcher's messages, rank 0's narration)."""
    if not command:
        raise UserError("launch: give the sidcore command to run after `--`")
    logdir.mkdir(parents=True, exist_ok=True)
    return Launcher(spec, command, logdir, lost_after_s=lost_after_s, echo=echo).run()
