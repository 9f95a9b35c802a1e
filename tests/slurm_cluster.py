"""A throw-away single-node SLURM cluster on loopback, for the launch/ tests.

:func:`start_cluster` writes its own ``slurm.conf``, a munge key, state and spool folders into a
directory, starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as child processes (so
they are stopped by pid, never by name), and waits until the node is idle. Every client command run
through :meth:`SlurmCluster.env` talks to this cluster only: ``SLURM_CONF`` points at the generated
file, whose ``AuthInfo`` names the private munge socket.

Needs root (slurmd starts jobs as their owner) and Debian's ``slurmctld slurmd slurm-client munge``
(``.ci/system_deps.sh`` installs them); :func:`missing_requirements` says what is missing.

Run ``python tests/slurm_cluster.py DIR`` to start one by hand (Ctrl-C stops it).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ports import free_port  # noqa: E402  (tests/ is not a package)

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
PARTITION = "debug"
# A finished job stays visible to `scontrol show job` this long (the tests read Restarts / ExitCode).
MIN_JOB_AGE_S = 600
# A requeued job may start again only once its launch credential expired (SLURM's default: 120 s).
CRED_EXPIRE_S = 10


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a SLURM test cluster needs root (slurmd runs jobs as their user)"
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return (f"SLURM/munge binaries missing: {', '.join(missing)} "
                f"(install Debian's slurmctld slurmd slurm-client munge, see .ci/system_deps.sh)")
    return None


@dataclass
class SlurmCluster:
    """A running cluster: its config file, node and partition names, and the daemons it started."""

    root: Path
    conf: Path
    node: str
    partition: str = PARTITION
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` pointed at this cluster, plus ``extra``."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a client command (``sbatch``, ``scontrol`` ...) against this cluster."""
        kwargs.setdefault("env", self.env())
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields of ``job_id`` as a dict ({} once the job is forgotten).

        For an array's parent id it returns the first task; use :meth:`array_jobs` for all of them.
        """
        jobs = self._show_jobs(job_id)
        return jobs[0] if jobs else {}

    def array_jobs(self, array_id: str) -> list[dict[str, str]]:
        """The fields of every task of job array ``array_id``."""
        return self._show_jobs(array_id)

    def _show_jobs(self, job_id: str) -> list[dict[str, str]]:
        done = self.run("scontrol", "--oneliner", "show", "job", job_id, check=False)
        if done.returncode != 0:
            return []
        return [_parse_fields(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until ``job_id`` is in one of ``states``; its fields. TimeoutError with the job's log."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s; last seen {info}\n"
                           f"{self.describe_failure(info)}")

    def wait_until_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait for a terminal state (COMPLETED, FAILED, ...); its fields."""
        return self.wait_for_state(job_id, TERMINAL_STATES, timeout)

    def describe_failure(self, info: dict[str, str]) -> str:
        """The tail of the job's output file and of the daemons' logs, for assertion messages."""
        parts = []
        out = info.get("StdOut")
        if out and Path(out).is_file():
            parts.append(f"--- {out} (tail)\n" + "\n".join(Path(out).read_text(errors="replace").splitlines()[-40:]))
        for name in ("slurmctld", "slurmd"):
            log = self.root / f"{name}.log"
            if log.is_file():
                parts.append(f"--- {log} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left and stop the daemons this cluster started (by pid, slurmd first)."""
        if self.processes.get("slurmctld") is not None and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--partition", self.partition, check=False, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is not None:
                _terminate(process)


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def start_cluster(root: Path, cpus: int | None = None, memory_mb: int = 8000, timeout: float = 60) -> SlurmCluster:
    """Write the configuration into ``root``, start the daemons, wait until the node is idle.

    ``cpus`` defaults to this machine's CPU count (the node must not claim more than it has).
    On any failure the daemons already started are stopped before the error propagates.
    """
    reason = missing_requirements()
    if reason:
        raise RuntimeError(reason)
    root = Path(root).resolve()
    for sub in ("state", "spool", "munge", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    conf = _write_config(root, node, cpus or os.cpu_count() or 1, memory_mb)
    cluster = SlurmCluster(root=root, conf=conf, node=node)
    try:
        _start_munged(cluster)
        cluster.processes["slurmctld"] = _daemon(cluster, "slurmctld", ["slurmctld", "-D", "-i"])
        _wait_for(lambda: cluster.run("scontrol", "ping", check=False, timeout=10).returncode == 0, timeout,
                  "slurmctld to answer `scontrol ping`", cluster)
        cluster.processes["slurmd"] = _daemon(cluster, "slurmd", ["slurmd", "-D", "-N", node])
        _wait_for(lambda: _node_state(cluster) == "idle", timeout, f"node {node} to become idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _write_config(root: Path, node: str, cpus: int, memory_mb: int) -> Path:
    socket_path = root / "munge" / "munge.socket"
    lines = [
        "ClusterName=passreid-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",       # memory is not a consumable: jobs asking --mem=0 can share
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "ReturnToService=2",
        f"MinJobAge={MIN_JOB_AGE_S}",
        "KillWait=30",
        "InactiveLimit=0",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")  # no cgroup.conf: proctrack/linuxproc and task/none use no cgroups
    return conf


def _start_munged(cluster: SlurmCluster) -> None:
    munge_dir = cluster.root / "munge"
    munge_dir.chmod(0o700)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = munge_dir / "munge.socket"
    command = ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
               f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={cluster.root / 'log' / 'munged.log'}",
               f"--seed-file={munge_dir / 'munged.seed'}"]
    cluster.processes["munged"] = _daemon(cluster, "munged", command)
    _wait_for(socket_path.exists, 20, "munged to open its socket", cluster)


def _daemon(cluster: SlurmCluster, name: str, command: list[str]) -> subprocess.Popen:
    log = (cluster.root / "log" / f"{name}.stdout").open("ab")
    return subprocess.Popen(command, env=cluster.env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _node_state(cluster: SlurmCluster) -> str:
    done = cluster.run("sinfo", "--noheader", "--nodes", cluster.node, "--format=%T", check=False, timeout=10)
    return done.stdout.strip().rstrip("*") if done.returncode == 0 else ""


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}\n"
                                   f"{_log_tail(cluster, name)}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                       f"{_log_tail(cluster, 'slurmctld')}\n{_log_tail(cluster, 'slurmd')}")


def _log_tail(cluster: SlurmCluster, name: str) -> str:
    texts = []
    for path in (cluster.root / f"{name}.log", cluster.root / "log" / f"{name}.stdout",
                 cluster.root / "log" / f"{name}.log"):
        if path.is_file():
            texts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
    return "\n".join(texts) or f"(no log of {name})"


def _terminate(process: subprocess.Popen, grace: float = 15) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


_FIELD = re.compile(r"(\w+(?:/\w+)?)=(.*?)(?=\s+\w+(?:/\w+)?=|$)")


def _parse_fields(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value two`` (scontrol --oneliner) -> dict; values may contain spaces."""
    return {key: value.strip() for key, value in _FIELD.findall(line.strip())}


def _serve(root: Path) -> None:
    """Start a cluster in ``root`` and keep it up until SIGINT/SIGTERM."""
    def _stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background (SIGINT ignored there)
    running = start_cluster(root)
    print(f"cluster up: export SLURM_CONF={running.conf}  (Ctrl-C or SIGTERM stops it)", flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slurm_cluster.py DIR")
    _serve(Path(sys.argv[1]))
