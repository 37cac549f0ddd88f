"""A real single-node SLURM on this machine for the launch-script tests (test_slurm.py).

``ensure_cluster()`` installs Debian's ``slurm-wlm`` and ``munge`` when ``slurmctld`` is missing
(as root, with apt; CI machines have the package registries), writes ``/etc/slurm/slurm.conf`` for
this host (CPUs from nproc, no GPU gres, JobRequeue=1, linuxproc tracking, no cgroups, no
accounting), starts munged, slurmctld and slurmd, and waits until the node is idle. A cluster this
module started earlier is reused; a site's own slurm.conf is never overwritten. Where a cluster
cannot be had (not root, no apt), it raises ``ClusterUnavailable`` with the reason, for a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_longctx.testing.reaper import unmarked_env
from megatron_longctx.testing.slurm_install import (  # noqa: F401 (re-exported)
    ClusterUnavailable,
    install as _install,
    start_munge as _start_munge,
)

CONF = Path("/etc/slurm/slurm.conf")
OURS = "# written by tests/integration/slurm_cluster.py"
STATE = Path("/var/spool/longctx-slurm")
LOGS = Path("/var/log/longctx-slurm")


def sh(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def _slurm_conf(host: str, cpus: int) -> str:
    return f"""{OURS}
ClusterName=longctx
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire + 1 s (default 120 s)
AuthInfo=cred_expire=15
StateSaveLocation={STATE}/ctld
SlurmdSpoolDir={STATE}/d
SlurmctldPidFile=/run/longctx-slurmctld.pid
SlurmdPidFile=/run/longctx-slurmd.pid
SlurmctldLogFile={LOGS}/slurmctld.log
SlurmdLogFile={LOGS}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=20
NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _node_state() -> str:
    try:
        return sh("sinfo", "-h", "-N", "-o", "%T", timeout=15, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _wait_idle(deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        state = _node_state()
        if state.startswith(("idle", "mixed", "allocated")):
            return True
        if state.startswith(("down", "drain")):
            sh("scontrol", "update", f"nodename={socket.gethostname()}", "state=resume",
               check=False)
        time.sleep(0.5)
    return False


def _stop_daemons() -> None:
    """Stops the daemons this module started (by the pid files its slurm.conf names)."""
    pids = []
    for name in ("slurmd", "slurmctld"):
        pid_file = Path(f"/run/longctx-{name}.pid")
        if pid_file.exists():
            try:
                pids.append(int(pid_file.read_text().strip()))
                os.kill(pids[-1], 15)
            except (ValueError, ProcessLookupError):
                pass
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) for pid in pids):
            return
        time.sleep(0.1)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@dataclass
class Cluster:
    host: str
    cpus: int
    log_dir: Path


def ensure_cluster(deadline_s: float = 60) -> Cluster:
    """Returns a running single-node cluster, starting (and installing) it if needed."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting a SLURM cluster needs root (installs packages, daemons)")
    host, cpus = socket.gethostname(), os.cpu_count() or 1
    wanted = _slurm_conf(host, cpus)
    if CONF.exists() and OURS not in CONF.read_text():  # this site's own SLURM: use it as it is
        if shutil.which("sinfo") and _wait_idle(5):
            return Cluster(host, int(sh("sinfo", "-h", "-o", "%c").stdout.split()[0]), LOGS)
        raise ClusterUnavailable(f"{CONF} belongs to this site's SLURM, which is not responding; "
                                 "not overwriting it")
    if CONF.exists() and CONF.read_text() == wanted and _wait_idle(2):
        return Cluster(host, cpus, LOGS)
    _install()
    _stop_daemons()  # ours, from an older slurm.conf or half running
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(wanted)
    for d in (STATE / "ctld", STATE / "d", LOGS):
        d.mkdir(parents=True, exist_ok=True)
    _start_munge()
    for daemon in ("slurmctld", "slurmd"):  # each forks into the background and returns
        p = subprocess.run(
            [daemon], capture_output=True, text=True, timeout=60, env=unmarked_env()
        )
        if p.returncode != 0:
            raise ClusterUnavailable(f"{daemon} did not start: {p.stderr[-1500:]}")
    if not _wait_idle(deadline_s):
        tail = "".join((LOGS / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                       if (LOGS / f).exists())
        raise ClusterUnavailable(
            f"node not idle after {deadline_s:.0f} s: {_node_state()!r}\n{tail}")
    return Cluster(host, cpus, LOGS)
