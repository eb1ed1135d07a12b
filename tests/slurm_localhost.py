"""A real single-node SLURM cluster on 127.0.0.1 for the tests: munge, MariaDB + slurmdbd (accounting),
slurmctld and slurmd, with fake GPUs.

Everything the daemons write (configuration, state, spool, logs, PID files, the database) lives in one
folder; clients find the cluster through ``SLURM_CONF``. ``stop()`` cancels the jobs and ends exactly the
daemons ``start()`` launched. Needs root and Debian's packages (``.ci/install-slurm``).

Snakemake's slurm-jobstep executor drops SLURM_CONF before its ``srun`` inside a job, which then reads
``/etc/slurm/slurm.conf``: where that file does not exist, ``start()`` links it to this cluster's
configuration for as long as the cluster runs, replacing a link that an interrupted run left behind.

The fake GPUs are character devices (major 195, like NVIDIA's): with them SLURM binds ``--gpus-per-node``
requests and sets ``CUDA_VISIBLE_DEVICES``; plain files or a count without ``File=`` do not work.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
CLUSTER = "sidtest"
PARTITION = "debug"
DB_PASSWORD = "sidtest-slurm"


def missing_binaries() -> list[str]:
    """Programs a local cluster needs that are not installed (empty when it can start)."""
    needed = ["munged", "munge", "unmunge", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld",
              "slurmd", "sbatch", "squeue", "sacct", "sacctmgr", "scontrol", "sinfo", "scancel", "mknod"]
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in needed if shutil.which(b, path=path) is None]


def _left_over(conf: Path) -> bool:
    """Whether ``conf`` is a link that an interrupted test run left behind (dangling, or to a test cluster)."""
    if not conf.is_symlink():
        return False
    target = conf.resolve()
    return not target.exists() or f"ClusterName={CLUSTER}\n" in target.read_text()


def conflicting_conf() -> str:
    """Why the local cluster cannot start beside this host's own SLURM configuration (empty when it can)."""
    if DEFAULT_CONF.exists() and not _left_over(DEFAULT_CONF):
        return (f"{DEFAULT_CONF} belongs to a SLURM installation; the test cluster needs that path, because "
                "Snakemake's slurm-jobstep executor drops SLURM_CONF")
    return ""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(*cmd: str, env: dict | None = None, input: str | None = None) -> str:
    out = subprocess.run(cmd, env=env, input=input, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _wait(what: str, check, timeout: float = 60.0, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"local SLURM: {what} not ready after {timeout:.0f} s\n{tail}")


class LocalSlurm:
    """One node (this host, as 127.0.0.1) with ``gpus`` fake GPUs in partition ``debug``."""

    def __init__(self, root: Path, gpus: int = 2) -> None:
        self.root, self.gpus = Path(root), gpus
        self.host = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}
        self.linked_default = False
        self.db_port, self.dbd_port, *_ = self.ports = _free_ports(4)  # MariaDB, slurmdbd, slurmctld, slurmd

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client of this cluster (``sbatch``, submitit, Snakemake)."""
        return {**os.environ, "SLURM_CONF": str(self.root / "etc" / "slurm.conf"),
                "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}

    # --- start -----------------------------------------------------------------------------------------
    def start(self) -> LocalSlurm:
        for sub in ("etc", "state", "spool", "log", "run", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # mysql reads its own folder below
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_configs()
            self._link_default_conf()
            self._start_slurmdbd()
            _run("sacctmgr", "-i", "add", "cluster", CLUSTER, env=self.env)
            self._start_daemon("slurmctld", ["slurmctld", "-f", self._conf], self.root / "run" / "slurmctld.pid")
            self._start_daemon("slurmd", ["slurmd", "-f", self._conf], self.root / "run" / "slurmd.pid")
            _wait("node idle", lambda: self.node_state() == "idle", log=self.root / "log" / "slurmd.log")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def _conf(self) -> str:
        return str(self.root / "etc" / "slurm.conf")

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged already runs on this host; it is not ours to stop
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        _wait("munged", lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0)
        self.pids["munged"] = int((run / "munged.pid").read_text())

    def _start_mariadb(self) -> None:
        db, sock = self.root / "db", self.root / "mysqld"
        for d in (db, sock):
            d.mkdir(exist_ok=True)
            shutil.chown(d, "mysql", "mysql")
        self.db_socket = sock / "mysqld.sock"
        _run("mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={db}", "--skip-test-db")
        pid_file = sock / "mysqld.pid"
        subprocess.Popen(["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={db}", "--bind-address=127.0.0.1",
                          f"--port={self.db_port}", f"--socket={self.db_socket}", f"--pid-file={pid_file}",
                          f"--log-error={self.root / 'log' / 'mariadb.log'}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = ["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root"]
        _wait("MariaDB", lambda: pid_file.exists() and subprocess.run([*client, "-e", "SELECT 1"],
                                                                      capture_output=True).returncode == 0,
              log=self.root / "log" / "mariadb.log")
        self.pids["mariadbd"] = int(pid_file.read_text())
        grants = "".join(f"CREATE USER 'slurm'@'{h}' IDENTIFIED BY '{DB_PASSWORD}';"
                         f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{h}';" for h in ("localhost", "127.0.0.1"))
        _run(*client, input=grants)

    def _write_configs(self) -> None:
        r = self.root
        node = _run("slurmd", "-C").splitlines()[0].split()
        hardware = " ".join(f for f in node if f.split("=")[0] in ("CPUs", "Boards", "SocketsPerBoard",
                                                                     "CoresPerSocket", "ThreadsPerCore", "RealMemory"))
        ctld_port, slurmd_port = self.ports[2:]
        (r / "etc" / "slurm.conf").write_text("\n".join([
            f"ClusterName={CLUSTER}", f"SlurmctldHost={self.host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}", "SlurmUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            "MpiDefault=none", "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/linux", "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost", f"AccountingStoragePort={self.dbd_port}",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "GresTypes=gpu", "ReturnToService=2",
            "MinJobAge=600", "KillWait=10", "SchedulerParameters=sched_interval=2",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 {hardware} Gres=gpu:{self.gpus} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        files = []
        for i in range(self.gpus):
            dev = r / "dev" / f"nvidia{i}"
            if not dev.exists():
                _run("mknod", "-m", "666", str(dev), "c", "195", str(i))
            files.append(f"Name=gpu File={dev}")
        (r / "etc" / "gres.conf").write_text("\n".join(["AutoDetect=off", *files, ""]))
        dbd = r / "etc" / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", "DbdHost=localhost", f"DbdPort={self.dbd_port}", "SlurmUser=root",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.db_port}",
            "StorageUser=slurm", f"StoragePass={DB_PASSWORD}", f"PidFile={r / 'run' / 'slurmdbd.pid'}",
            f"LogFile={r / 'log' / 'slurmdbd.log'}", ""]))
        dbd.chmod(0o600)

    def _link_default_conf(self) -> None:
        if DEFAULT_CONF.exists() and not _left_over(DEFAULT_CONF):
            return  # a real installation's configuration: conflicting_conf() has reported it
        if DEFAULT_CONF.is_symlink():
            DEFAULT_CONF.unlink()  # a link left by an interrupted run, to a cluster that no longer runs
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self._conf)
        self.linked_default = True

    def _start_slurmdbd(self) -> None:
        self._start_daemon("slurmdbd", ["slurmdbd"], self.root / "run" / "slurmdbd.pid")
        _wait("slurmdbd", lambda: subprocess.run(["sacctmgr", "-n", "list", "cluster"], env=self.env,
                                                  capture_output=True).returncode == 0,
              log=self.root / "log" / "slurmdbd.log")

    def _start_daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        subprocess.run(cmd, env=self.env, check=True, timeout=60)  # daemonises
        _wait(name, pid_file.exists, log=self.root / "log" / f"{name}.log")
        self.pids[name] = int(pid_file.read_text())

    # --- use ------------------------------------------------------------------------------------------
    def node_state(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-n", self.host, "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.stdout.strip()

    def job_state(self, job_id: str) -> str:
        """The job's state from accounting (``sacct``), e.g. RUNNING, COMPLETED, REQUEUED."""
        out = _run("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State", env=self.env)
        return out.splitlines()[0].split()[0] if out.strip() else ""

    def scontrol(self, *args: str) -> str:
        return _run("scontrol", *args, env=self.env)

    # --- stop -----------------------------------------------------------------------------------------
    def stop(self) -> None:
        if "slurmctld" in self.pids:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            end = time.monotonic() + 30
            while time.monotonic() < end and _alive(pid):
                time.sleep(0.1)
        if self.linked_default and DEFAULT_CONF.is_symlink() and str(DEFAULT_CONF.readlink()) == self._conf:
            DEFAULT_CONF.unlink()
            self.linked_default = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours has exited
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
