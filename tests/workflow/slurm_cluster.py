"""A real single-node SLURM cluster for the tests: Debian's slurm-wlm and munge, started and stopped here.

`SlurmCluster(folder).start()` writes a minimal ``/etc/slurm/slurm.conf`` (loopback, one partition
``cpu``, ``ProctrackType=proctrack/linuxproc``, ``SelectType=select/cons_tres``, no accounting),
starts munged (unless one runs), slurmctld and slurmd, and waits until the node is idle; `stop()`
cancels every job, stops what it started and removes the config it wrote. The config goes to
``/etc/slurm`` because a job step (``srun`` inside a batch job) reads the default path, whatever
``SLURM_CONF`` the submitting process had. A ``slurm.conf`` that mechflow did not write is never
touched: the test is skipped instead (a machine with a real cluster config is not a test machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MARKER = "# written by mechflow's tests (tests/workflow/slurm_cluster.py)"
CONF = Path("/etc/slurm/slurm.conf")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be started here (the reason is the message)."""


def _run(*cmd: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


class SlurmCluster:
    def __init__(self, folder: Path, cpus: int | None = None, memory_mb: int = 20000):
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.host = socket.gethostname()
        self.started: list[Path] = []  # pid files of the daemons started here
        self.munged_pid: int | None = None

    def conf_text(self) -> str:
        f = self.folder
        return "\n".join([
            MARKER,
            "ClusterName=mechflow-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible to squeue: job status without accounting
            f"StateSaveLocation={f}/state", f"SlurmdSpoolDir={f}/spool",
            f"SlurmctldPidFile={f}/slurmctld.pid", f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/slurmctld.log", f"SlurmdLogFile={f}/slurmd.log",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def start(self) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld / slurmd / munged needs root")
        for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo"):
            if not shutil.which(tool):
                raise SlurmUnavailable(f"{tool} is not installed (apt-get install slurm-wlm munge)")
        if CONF.exists() and MARKER not in CONF.read_text():
            raise SlurmUnavailable(f"{CONF} exists and was not written by mechflow's tests: not touching it")
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(self.conf_text())
        self._start_munged()
        for daemon, pid in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            args = [daemon, "-c"] if daemon == "slurmctld" else [daemon]  # -c: no state of an earlier run
            done = _run(*args)
            if done.returncode != 0:
                self.stop()
                raise SlurmUnavailable(f"{daemon} did not start: {done.stderr.strip()[-300:]}")
            self.started.append(self.folder / pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = _run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state == "idle":
                return self
            time.sleep(1)
        log = (self.folder / "slurmctld.log").read_text()[-500:] if (self.folder / "slurmctld.log").exists() else ""
        self.stop()
        raise SlurmUnavailable(f"the SLURM node did not become idle within 60 s (sinfo: {state!r}); {log}")

    def _start_munged(self) -> None:
        if _run("munge", "-n").returncode == 0:
            return  # a munged already runs
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run("mungekey", "--create")
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        done = _run("runuser", "-u", "munge", "--", "munged")
        if done.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {done.stderr.strip()[-300:]}")
        pid = Path("/run/munge/munged.pid")
        self.munged_pid = int(pid.read_text()) if pid.exists() else None

    def stop(self) -> None:
        _run("scancel", "--user", "root")
        for pid_file in reversed(self.started):
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in self.started):
            time.sleep(0.5)
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.started = []
        if CONF.exists() and MARKER in CONF.read_text():
            CONF.unlink()


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False
