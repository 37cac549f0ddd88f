"""Jobs on the multi-node test cluster (megatron_longctx/testing/slurm_net.py) for
test_slurm_multinode.py: submit launch/prolong_512k.sh from the controller, read its state, log,
metrics and the tasks' pid files, inject faults into the node that runs a given rank."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from megatron_longctx.testing.slurm_net import NetCluster
from tests.integration.run_utils import ROOT

SCRIPT = ROOT / "launch" / "prolong_512k.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def cp2_recipe(path: Path, steps: int = 6) -> Path:
    """examples/tiny_test.yaml's CP 2 stage ('long') alone, ``steps`` steps, a checkpoint every
    2, and a hang bound for a loaded 2-core machine (steps of 0.4 s took up to 6.5 s there):
    3 x the slowest step, at least 20 s, at most 45 s (a save's bound: saves take ~3 s idle)."""
    cfg = yaml.safe_load((ROOT / "examples" / "tiny_test.yaml").read_text())
    cfg["stages"] = [dict(cfg["stages"][1], steps=steps, checkpoint_interval=2)]
    cfg["checkpoint"]["keep_last"] = 10
    cfg["training"] = {"hang_timeout_factor": 3.0, "hang_timeout_min_s": 20.0,
                       "hang_timeout_max_s": 45.0}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class NetJob:
    """One ``sbatch -N 2 --ntasks-per-node=1 launch/prolong_512k.sh`` on the cluster. srun gives
    the other tasks 20 s after the first one ends (LONGCTX_TASK_GRACE_S; rank 0 still plots the
    loss curve after rank 1 is done, a few seconds on an idle machine), which is also how long a
    frozen rank lives on after another found the hang."""

    def __init__(self, cluster: NetCluster, recipe: Path, run_dir: Path, data_dir: Path,
                 sbatch_args: tuple[str, ...] = (), **env: str):
        self.cluster, self.run_dir, self.log = cluster, run_dir, run_dir / "job.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LONGCTX_", "SLURM_"))}
        full_env = dict(base, LONGCTX_CONFIG=str(recipe), LONGCTX_DEVICE="cpu",
                        LONGCTX_RUN=str(run_dir), LONGCTX_DATA=str(data_dir),
                        LONGCTX_PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_MODE="offline",
                        LONGCTX_TASK_GRACE_S="20", **env)
        p = cluster.run("ctl", "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                        "--gpus-per-node=0", "--time=20", f"--output={self.log}", *sbatch_args,
                        str(SCRIPT), env=full_env, wd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr
        self.id = p.stdout.strip().split(";")[0]

    def info(self) -> dict:
        try:
            out = self.cluster.scontrol("show", "job", "-o", self.id, timeout=20)
        except Exception:  # noqa: BLE001 (a loaded controller: ask again)
            return {"JobState": "", "Restarts": "", "ExitCode": "", "NodeList": ""}
        keys = ("JobState", "Restarts", "ExitCode", "NodeList")
        found = {k: re.search(rf"\b{k}=(\S+)", out) for k in keys}
        return {k: m.group(1) if m else "" for k, m in found.items()}

    def wait(self, deadline_s: float, on_poll=None) -> dict:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            info = self.info()
            if info["JobState"] in FINAL_STATES:
                return info
            if on_poll:
                on_poll(info)
            time.sleep(0.25)
        self.cancel()
        raise AssertionError(f"job {self.id} still {self.info()} after {deadline_s} s:\n"
                             + self.text()[-4000:] + self.cluster.log_tail())

    def cancel(self) -> None:
        try:
            self.cluster.run("ctl", "scancel", self.id, timeout=20)
        except Exception:  # noqa: BLE001 (teardown goes on)
            pass

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no job log)"

    def metrics(self) -> list[dict]:
        path, recs = self.run_dir / "metrics.jsonl", []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return recs

    def losses(self) -> list[tuple[int, float]]:
        return [(r["iteration"], r["loss"]) for r in self.metrics()]

    def task(self, rank: int) -> tuple[str, int] | None:
        """(host, pid) of the trainer of ``rank`` in the current run (its pid file)."""
        for f in (self.run_dir / "launch" / self.id).glob(f"*.{rank}.pid"):
            try:
                return f.name.split(".")[0], int(f.read_text().strip())
            except ValueError:  # being written
                return None
        return None
