"""A private one-node SLURM cluster for tests: munged + slurmctld + slurmd in a temp dir.

    with slurm_cluster(tmp_dir) as cluster:
        cluster.run(["sbatch", "--parsable", "job.sh"])   # SLURM_CONF is set for you
        cluster.job_state("12_0")                        # "RUNNING", "COMPLETED", ...

Everything the daemons write (key, sockets, pid files, state, spool, logs) lives under
`tmp_dir`, ports are picked free, and munged gets its own socket, so a system SLURM or
munge on the same machine is never touched. On exit every daemon this module started is
stopped by its pid (also when start-up fails); nothing else is signalled.

Needs root (SlurmUser=root, slurmd launches jobs) and the Debian packages `slurm-wlm`
and `munge` (`launchers/install_slurm.sh`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Debian installs the daemons in /usr/sbin, which non-login shells may not have on PATH.
SBIN_DIRS = ("/usr/sbin", "/sbin")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")


def find_tool(name: str) -> str | None:
    """Path of a SLURM/munge executable, looking in /usr/sbin too."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_tools() -> list[str]:
    """Executables this module needs that are not installed (empty when all are there)."""
    return [name for name in DAEMONS + CLIENTS if find_tool(name) is None]


def _free_port() -> int:
    # Bind to port 0 so the kernel picks an unused port; a tiny race until slurmctld binds
    # it is acceptable for tests and avoids colliding with a system SLURM on 6817/6818.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    # slurmd marks the node invalid if the configured RealMemory exceeds what it detects,
    # so configure at most the design's 20000 MB and never more than the machine has.
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return min(20000, int(line.split()[1]) // 1024 - 256)
    return 1000


@dataclass
class SlurmCluster:
    """Handle on a running private cluster: paths, env and small query helpers."""

    root: Path
    conf: Path
    node: str
    env: dict[str, str]
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, args: list[str], check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; text output captured."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}\n" + self.daemon_logs()
            )
        return proc

    def job_fields(self, job_id: str) -> dict[str, str] | None:
        """`scontrol show job` as a dict (None once the job left slurmctld's memory).

        sacct needs a database daemon, so state is read from slurmctld, which keeps
        finished jobs for MinJobAge seconds (set long in the conf below).
        """
        proc = self.run(["scontrol", "--oneliner", "show", "job", job_id], check=False)
        if proc.returncode != 0:
            return None
        fields: dict[str, str] = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:  # first wins: e.g. JobState before nested keys
                fields[key] = value
        return fields

    def job_state(self, job_id: str) -> str | None:
        fields = self.job_fields(job_id)
        return fields.get("JobState") if fields else None

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 60, poll_s: float = 0.3) -> dict[str, str]:
        """Poll until the job is in one of `states`; on timeout raise with daemon logs."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] | None = None
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields and fields.get("JobState") in states:
                return fields
            time.sleep(poll_s)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f}s; last seen: "
            f"{fields and {k: fields.get(k) for k in ('JobState', 'Reason', 'ExitCode', 'Restarts')}}\n"
            + self.daemon_logs()
        )

    def daemon_logs(self, tail_lines: int = 40) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else "(no log file)"
            tail = "\n".join(text.splitlines()[-tail_lines:])
            parts.append(f"--- {name} log ({path}) ---\n{tail}")
        return "\n".join(parts)


def _write_conf(root: Path, node: str, ctld_port: int, slurmd_port: int, munge_socket: Path) -> Path:
    state = root / "state"
    spool = root / "spool"
    for d in (state, spool):
        d.mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# Generated by tests/slurm_cluster.py for a private one-node test cluster.
ClusterName=saetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
# Our own munged socket, so a system munged (if any) is neither needed nor disturbed.
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={state}
SlurmdSpoolDir={spool}/slurmd-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# `scontrol requeue` and `sbatch --requeue` need requeueing enabled.
JobRequeue=1
# SIGTERM -> SIGKILL after 15 s (SLURM's default: 30). A job that exits on SIGTERM ends at once
# whatever this is; a plain scancel needs the checkpoint and the script's `scontrol` check to fit
# in it, and with 2 s a loaded 2-core test machine once killed the script before it said so.
KillWait=15
# Keep finished jobs visible to `scontrol show job` (no accounting DB here) for 10 min.
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
# Requeued jobs become eligible only after cred_expire (AuthInfo above; default 120 s);
# then the periodic scheduler must pick them up: run it every second, not every 60 s.
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _stop(procs: dict[str, subprocess.Popen], timeout: float = 10) -> None:
    """Stop the daemons we started, newest first, by pid: TERM, then KILL if they hang."""
    for proc in reversed(list(procs.values())):
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@contextlib.contextmanager
def slurm_cluster(tmp_dir: str | os.PathLike, start_timeout: float = 30) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under `tmp_dir`; yield a SlurmCluster; stop them."""
    missing = missing_tools()
    if missing:
        raise FileNotFoundError(
            f"SLURM/munge executables not found: {', '.join(missing)}; install them with launchers/install_slurm.sh"
        )
    if os.geteuid() != 0:
        raise PermissionError("the test cluster runs slurmd with SlurmUser=root and needs root")

    root = Path(tmp_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # munged refuses key/socket dirs that group/other can write to.
    os.chmod(root, 0o700)
    node = socket.gethostname().split(".")[0]  # slurmd registers under the short hostname
    munge_socket = root / "munge.socket"
    key = root / "munge.key"
    logs = {"munged": root / "munged.log", "slurmctld": root / "slurmctld.log", "slurmd": root / "slurmd.log"}
    conf = _write_conf(root, node, _free_port(), _free_port(), munge_socket)
    env = dict(
        os.environ, SLURM_CONF=str(conf), PATH=os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    )
    cluster = SlurmCluster(root=root, conf=conf, node=node, env=env, logs=logs)

    try:
        subprocess.run(
            [find_tool("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True, text=True
        )
        # -F: stay in the foreground so the Popen pid is the daemon's pid (stop by pid);
        # -f: allow running as root and in a /tmp path.
        cluster.procs["munged"] = subprocess.Popen(
            [
                find_tool("munged"),
                "-F",
                "-f",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--log-file={logs['munged']}",
                f"--pid-file={root / 'munged.pid'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "munged.stderr", "w"),
        )
        _wait_for(lambda: munge_socket.exists(), 10, "munged socket", cluster)

        # -D: foreground, so the daemons are our children and their pids are the Popen pids.
        for daemon in ("slurmctld", "slurmd"):
            cluster.procs[daemon] = subprocess.Popen(
                [find_tool(daemon), "-D", "-f", str(conf)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(root / f"{daemon}.stderr", "w"),
            )
            if daemon == "slurmctld":
                _wait_for(
                    lambda: cluster.run(["scontrol", "ping"], check=False).returncode == 0,
                    start_timeout,
                    "slurmctld to answer `scontrol ping`",
                    cluster,
                )

        def node_idle() -> bool:
            out = cluster.run(["sinfo", "--noheader", "-N", "-o", "%T"], check=False).stdout
            return out.strip() == "idle"

        _wait_for(node_idle, start_timeout, f"node {node} to be idle in sinfo", cluster)
        yield cluster
    finally:
        _cancel_jobs(cluster)
        _stop(cluster.procs)


def _cancel_jobs(cluster: SlurmCluster, timeout: float = 15) -> None:
    """Cancel every job of this private cluster and wait for them to end.

    Job processes run under slurmstepd, which outlives slurmd; a test that fails mid-job
    would otherwise leave its program running after the cluster is gone.
    """
    if "slurmctld" not in cluster.procs or cluster.procs["slurmctld"].poll() is not None:
        return
    cluster.run(["scancel", "--partition=debug"], check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run(["squeue", "--noheader", "-o", "%i"], check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.3)


def _wait_for(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n" + _stderr_and_logs(cluster))
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n" + _stderr_and_logs(cluster))


def _stderr_and_logs(cluster: SlurmCluster) -> str:
    parts = [cluster.daemon_logs()]
    for name in cluster.procs:
        err = cluster.root / f"{name}.stderr"
        if err.exists() and err.stat().st_size:
            parts.append(f"--- {name} stderr ---\n{err.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)
