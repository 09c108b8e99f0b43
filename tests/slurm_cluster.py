"""A real Slurm cluster on this one host, for the tests: munged, slurmctld and two slurmd daemons (nodes n1, n2).

Debian's `slurm-wlm` and `munge` packages provide the daemons. Everything lives in a temporary folder: a freshly
generated munge key and socket, `slurm.conf` (found by the clients through `SLURM_CONF`), state, spool and logs.
Both nodes answer on 127.0.0.1 with ports of their own and one CPU each; `stop()` ends exactly the processes
`start()` began (by the pid files they wrote) and removes the folder.

    python tests/slurm_cluster.py     # start one by hand, print the environment to use it; Ctrl-C (or SIGTERM) stops it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")
NODES = ("n1", "n2")
REQUIRE_ENV = "CIFAR_RECIPES_REQUIRE_SLURM"  # set by .ci/run: Slurm tests fail instead of skipping


def missing_binaries() -> list[str]:
    """The Slurm and munge programs this host lacks (searched on PATH and in the sbin folders)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return [name for name in DAEMONS if shutil.which(name, path=path) is None]


def _binary(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=path) or name


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


SLURM_CONF = """\
ClusterName=cifartest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=3600
KillWait=5
SchedulerParameters=sched_interval=1
MessageTimeout=30
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd for n1 and n2, in `root` (a new temporary folder unless given)."""

    def __init__(self) -> None:
        # munged wants its socket's folder (and every folder above) searchable by all
        self.root = Path(tempfile.mkdtemp(prefix="cifar-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})

    def logs(self) -> str:
        """The last lines of each daemon's log (munged, slurmctld, both slurmd), for a failure's message."""
        parts = []
        for path in sorted(self.root.rglob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def start(self, timeout: float = 60) -> SlurmCluster:
        for folder in ("munge", "state", "log", "spool/n1", "spool/n2"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = self.root / "munge"
        self._daemon(
            munge / "munged.pid",
            _binary("munged"),
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        ctld_port, port1, port2 = _free_ports(3)
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                user=_user(),
                root=self.root,
                ctld_port=ctld_port,
                port1=port1,
                port2=port2,
            )
        )
        self._daemon(self.root / "slurmctld.pid", _binary("slurmctld"), "-f", str(self.conf), "-i")
        for node in NODES:
            self._daemon(self.root / f"slurmd-{node}.pid", _binary("slurmd"), "-f", str(self.conf), "-N", node)
        self._wait_idle(timeout)
        return self

    def _daemon(self, pid_file: Path, *command: str) -> None:
        """Start a daemon that forks into the background and writes `pid_file`; wait for the file."""
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        self._pid_files.append(pid_file)
        deadline = time.time() + 30
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            if time.time() > deadline:
                raise RuntimeError(
                    f"{Path(command[0]).name} did not start (status {done.returncode}): {done.stderr.strip()}\n"
                    + self.logs()
                )
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline, shown = time.time() + timeout, ""
        while time.time() < deadline:
            done = self._run("sinfo", "-h", "-N", "-o", "%N %T")
            shown = done.stdout.strip() + done.stderr.strip()
            states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
            if done.returncode == 0 and all(states.get(node) == "idle" for node in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the two Slurm nodes did not come up idle within {timeout:.0f}s ({shown})\n{self.logs()}")

    def stop(self) -> None:
        """End the daemons this object started (the Slurm ones together, then munged), then remove its folder."""
        pids = []
        for pid_file in self._pid_files:
            try:
                pids.append(int(pid_file.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        _terminate(pids[1:])  # slurmctld and both slurmd
        _terminate(pids[:1])  # munged, which they talk to until they end
        self._pid_files.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pids: list[int], timeout: float = 20) -> None:
    """SIGTERM each of `pids`, then SIGKILL those still there after `timeout` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    cluster = SlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
