"""Installing and starting what every SLURM test cluster needs: Debian's ``slurm-wlm`` and
``munge`` (as root, with apt, when ``slurmctld`` is missing; CI machines have the package
registries) and a running munged. Shared by the single-node cluster
(tests/integration/slurm_cluster.py) and the multi-node one (testing/slurm_net.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from megatron_longctx.testing.reaper import unmarked_env


class ClusterUnavailable(RuntimeError):
    """No SLURM can be started here; the message says why."""


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def install() -> None:
    """Installs slurm-wlm and munge with apt-get unless slurmctld and munged are there."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurm-wlm is not installed, and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("slurmctld is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if p.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {p.stderr[-1500:]}")


def start_munge() -> None:
    """Starts munged (a key is made if there is none) unless ``munge -n`` already works."""
    if _ok("munge", "-n"):
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    subprocess.run(
        ["runuser", "-u", "munge", "--", "munged", "--force"],
        check=False,
        timeout=30,
        env=unmarked_env(),  # a daemon that outlives the test session: the reaper spares it
    )
    for _ in range(50):
        if _ok("munge", "-n"):
            return
        time.sleep(0.2)
    raise ClusterUnavailable("munged did not start (munge -n fails)")
