"""A multi-node SLURM cluster on one machine, for tests: a controller and N compute nodes, each a
Linux network namespace with its own hostname and address on a private bridge.

Layout (facts measured in /work/shared/SLURM_MULTINODE.md):
* a bridge ``br0`` in a namespace of its own (``<prefix>sw``), one veth per node; addresses from
  10.77.0.0/24 (controller .10, node i .10+i), no default route anywhere: nothing leaves the
  test network, and the machine's own namespace gets no interface or route;
* every node (and the controller) is a *holder* process (``sleep infinity`` in the node's network
  namespace and its own UTS and mount namespaces, with the hostname set and a private
  ``/etc/hosts`` bind-mounted), like a pod's pause process; daemons and clients enter it with
  ``nsenter -t PID -n -u -m --wd=...`` (not ``ip netns exec``, which remounts /sys and makes slurmd
  fail on cgroups);
* a slurm.conf, state, spool, pid and log files of its own under ``root`` (``SLURM_CONF`` for the
  clients, ``-f`` for the daemons); the machine's munged is shared (its socket is a file).
Each node has one CPU (one task slot). Tear-down stops the daemons by their pid files, kills by
PID only the processes ``ip netns pids`` lists in this cluster's namespaces (and the holders), and
deletes the namespaces (which removes the bridge and the veths). Namespace names carry a random
prefix, so concurrent test sessions never meet.

``start_cluster()`` raises ``ClusterUnavailable`` with the reason where a cluster cannot be had
(not root, no slurm-wlm and no apt-get, no ``ip``/``nsenter``), for a skip.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from megatron_longctx.testing.slurm_install import ClusterUnavailable, install, start_munge

logger = logging.getLogger(__name__)

SUBNET = "10.77.0"
CTL_ADDR = f"{SUBNET}.10"

# SlurmdTimeout: a node that stops answering is DOWN (and its jobs NODE_FAIL) after this long.
# cred_expire: a requeued job is eligible again cred_expire + 1 s after the requeue (default 120).
CONF_TEMPLATE = """# written by megatron_longctx/testing/slurm_net.py
ClusterName=lcnet
SlurmctldHost=ctl({ctl_addr})
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire={cred_expire}
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
MpiDefault=none
ReturnToService=1
SlurmdTimeout={slurmd_timeout}
MessageTimeout=5
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise ClusterUnavailable(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class NetCluster:
    """A running cluster. ``nodes``: compute node names (n1, n2, ...); ``root``: its directory."""

    root: Path
    prefix: str
    nodes: list[str]
    holders: dict[str, subprocess.Popen] = field(default_factory=dict)  # ctl and every node

    # -- addresses and commands ----------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def addr(self, host: str) -> str:
        return CTL_ADDR if host == "ctl" else f"{SUBNET}.{10 + int(host[1:])}"

    def netns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def env(self, base: dict | None = None) -> dict:
        out = dict(os.environ if base is None else base)
        out["SLURM_CONF"] = str(self.conf)
        return out

    def enter(self, host: str, *cmd: str, wd: str | Path | None = None) -> list[str]:
        """``cmd`` as run inside ``host`` (ctl, n1, ...): its network, hostname and /etc/hosts."""
        pid = self.holders[host].pid
        return ["nsenter", "-t", str(pid), "-n", "-u", "-m", f"--wd={wd or os.getcwd()}", "--",
                *cmd]

    def run(self, host: str, *cmd: str, timeout: float = 30, env: dict | None = None,
            wd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Runs a command (e.g. a SLURM client) inside ``host`` with this cluster's SLURM_CONF."""
        return subprocess.run(self.enter(host, *cmd, wd=wd), capture_output=True, text=True,
                              timeout=timeout, env=self.env(env))

    def scontrol(self, *args: str, timeout: float = 30) -> str:
        return self.run("ctl", "scontrol", *args, timeout=timeout).stdout

    def node_states(self) -> dict[str, str]:
        """{node: state} from sinfo (e.g. idle, allocated, down*, unknown)."""
        try:
            out = self.run("ctl", "sinfo", "-h", "-N", "-o", "%N %T", timeout=15).stdout
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def wait_nodes(self, want=("idle",), nodes: list[str] | None = None,
                   deadline_s: float = 60) -> dict[str, str]:
        """Waits until every node of ``nodes`` (default all) is in one of the states ``want``."""
        nodes = nodes or self.nodes
        end = time.monotonic() + deadline_s
        states: dict[str, str] = {}
        while time.monotonic() < end:
            states = self.node_states()
            if all(states.get(n, "").rstrip("*~#") in want for n in nodes):
                return states
            time.sleep(0.2)
        raise ClusterUnavailable(f"nodes {nodes} not {want} after {deadline_s:.0f} s: {states}\n"
                                 + self.log_tail())

    def log_tail(self, chars: int = 1500) -> str:
        logs = [self.root / "slurmctld.log", *(self.root / f"slurmd-{n}.log" for n in self.nodes)]
        return "".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in logs if p.exists())

    def pids_in(self, host: str) -> list[int]:
        """Every process in ``host``'s network namespace (its slurmd, job steps, tasks)."""
        out = _run("ip", "netns", "pids", self.netns(host), check=False).stdout
        return [int(x) for x in out.split() if x.isdigit()]

    def daemon_pid(self, host: str) -> int | None:
        name = "slurmctld.pid" if host == "ctl" else f"slurmd-{host}.pid"
        try:
            return int((self.root / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def link_bytes(self, host: str) -> int:
        """Bytes sent plus received so far on ``host``'s link to the bridge."""
        out = _run("ip", "-n", self.netns("sw"), "-s", "-j", "link", "show", f"v-{host}").stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])

    # -- faults --------------------------------------------------------------------------------
    def kill_node(self, host: str) -> list[int]:
        """The node dies: SIGKILL its slurmd, its slurmstepds and its tasks (every process in its
        namespaces except the holder, which keeps the namespaces for a restart)."""
        pids = [p for p in self.pids_in(host) if p != self.holders[host].pid]
        for pid in pids:
            _kill(pid)
        return pids

    def start_slurmd(self, host: str) -> None:
        self._start_daemon(host, "slurmd", "-f", str(self.conf))

    def set_link(self, host: str, up: bool) -> None:
        """Cuts (or restores) ``host``'s link to the bridge: its processes live on, unreachable."""
        _run("ip", "-n", self.netns("sw"), "link", "set", f"v-{host}", "up" if up else "down")

    # -- lifecycle -----------------------------------------------------------------------------
    def _start_daemon(self, host: str, *cmd: str) -> None:
        p = subprocess.run(self.enter(host, *cmd, wd=self.root), capture_output=True, text=True,
                           timeout=60, env=self.env())
        if p.returncode != 0:
            raise ClusterUnavailable(f"{cmd[0]} on {host} did not start: {p.stderr[-1500:]}\n"
                                     + self.log_tail())

    def _holder(self, host: str) -> subprocess.Popen:
        hosts = self.root / "hosts"
        script = f"hostname {host} && mount --bind {hosts} /etc/hosts && exec sleep infinity"
        return subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns(host)}", "unshare", "--uts", "--mount",
             "--propagation", "slave", "sh", "-c", script],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def _wait_holder(self, host: str, deadline_s: float = 20) -> None:
        end = time.monotonic() + deadline_s
        pid = self.holders[host].pid
        while time.monotonic() < end:
            if self.holders[host].poll() is not None:
                raise ClusterUnavailable(f"the holder of {host} exited "
                                         f"({self.holders[host].returncode})")
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ClusterUnavailable(f"the holder of {host} did not start in {deadline_s} s")

    def _network(self) -> None:
        sw = self.netns("sw")
        for host in ["sw", "ctl", *self.nodes]:
            _run("ip", "netns", "add", self.netns(host))
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for host in ["ctl", *self.nodes]:
            ns = self.netns(host)
            _run("ip", "-n", sw, "link", "add", f"v-{host}", "type", "veth", "peer", "name",
                 "eth0", "netns", ns)
            _run("ip", "-n", sw, "link", "set", f"v-{host}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def teardown(self) -> None:
        """Stops everything this cluster started, by PID only, and deletes its namespaces."""
        for host in [*self.nodes, "ctl"]:
            pid = self.daemon_pid(host)
            if pid and pid in self.pids_in(host):  # never a recycled pid outside our namespace
                _kill(pid, signal.SIGTERM)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(
                (pid := self.daemon_pid(h)) and _alive(pid) and pid in self.pids_in(h)
                for h in [*self.nodes, "ctl"]):
            time.sleep(0.1)
        for host in ["ctl", *self.nodes, "sw"]:
            for pid in self.pids_in(host):
                _kill(pid)
        for holder in self.holders.values():
            _kill(holder.pid)
            try:
                holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("holder %d did not exit", holder.pid)
        for host in ["ctl", *self.nodes, "sw"]:
            _run("ip", "netns", "del", self.netns(host), check=False)


def start_cluster(root: Path, nodes: int = 3, slurmd_timeout: int = 10, cred_expire: int = 5,
                  deadline_s: float = 60) -> NetCluster:
    """Starts a controller and ``nodes`` compute nodes (n1..nN, one CPU each) under ``root``;
    returns once every node is idle. On failure everything started is torn down again."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("a multi-node SLURM test cluster needs root (namespaces, daemons)")
    for tool in ("ip", "nsenter", "unshare"):
        if not shutil.which(tool):
            raise ClusterUnavailable(f"{tool} is not installed (iproute2 / util-linux)")
    install()
    start_munge()
    root = Path(root)
    prefix = f"lc{uuid.uuid4().hex[:6]}-"
    cluster = NetCluster(root=root, prefix=prefix, nodes=[f"n{i}" for i in range(1, nodes + 1)])
    try:
        for d in (root / "ctld", *(root / "spool" / n for n in cluster.nodes)):
            d.mkdir(parents=True, exist_ok=True)
        (root / "hosts").write_text(
            "127.0.0.1 localhost\n"
            + "".join(f"{cluster.addr(h)} {h}\n" for h in ["ctl", *cluster.nodes]))
        node_lines = "\n".join(f"NodeName={n} NodeAddr={cluster.addr(n)} CPUs=1 RealMemory=1000 "
                               "State=UNKNOWN" for n in cluster.nodes)
        cluster.conf.write_text(CONF_TEMPLATE.format(
            ctl_addr=CTL_ADDR, root=root, nodes=node_lines, slurmd_timeout=slurmd_timeout,
            cred_expire=cred_expire))
        cluster._network()
        for host in ["ctl", *cluster.nodes]:
            cluster.holders[host] = cluster._holder(host)
        for host in cluster.holders:
            cluster._wait_holder(host)
        cluster._start_daemon("ctl", "slurmctld", "-f", str(cluster.conf))
        for node in cluster.nodes:
            cluster.start_slurmd(node)
        cluster.wait_nodes(("idle",), deadline_s=deadline_s)
    except BaseException:
        cluster.teardown()
        raise
    return cluster
