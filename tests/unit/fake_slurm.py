"""Stand-ins for srun / scontrol / squeue / scancel / sbatch and the trainer, for bash-level tests
of launch/common.sh where a one-node SLURM cannot show the behaviour (a hanging step, a multi-node
node list, GPU binding, containers, the restart cap) or would take minutes.

Each fake appends one line per call to ``calls.log`` (``srun --overlap ...``); the trainer writes
its environment and arguments per task. Behaviour is set through ``FAKE_*`` environment variables
(documented in each script). The launcher itself, ``setsid``, ``timeout`` and ``bash`` are real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SRUN = r"""#!/bin/bash
# The signalling step (--overlap) runs its command once, or hangs (FAKE_FORWARD_HANG), then waits
# FAKE_FORWARD_DELAY s (a slow step teardown); the trainer step (--label) runs FAKE_NTASKS tasks
# with SLURM_PROCID / SLURM_LOCALID and, per FAKE_GPUS, CUDA_VISIBLE_DEVICES of the node ("node") or
# of the task alone ("task"); any other step runs its command once.
echo "srun $*" >>"$FAKE_DIR/calls.log"
opts=()
while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
has() { local o; for o in "${opts[@]}"; do [[ $o == "$1" ]] && return 0; done; return 1; }
if has --overlap; then
    [[ -n ${FAKE_FORWARD_HANG:-} ]] && exec sleep 600
    SLURM_PROCID=0 "$@"
    rc=$?
    sleep "${FAKE_FORWARD_DELAY:-0}"
    exit $rc
fi
if has --label; then
    pids=()
    n=${FAKE_NTASKS:-2}
    for ((i = 0; i < n; i++)); do
        case ${FAKE_GPUS:-} in
            node) gpus=$(seq -s, 0 $((n - 1))) ;;
            task) gpus=$i ;;
            *) gpus="" ;;
        esac
        if [[ -n $gpus ]]; then
            SLURM_PROCID=$i SLURM_LOCALID=$i CUDA_VISIBLE_DEVICES=$gpus "$@" &
        else
            SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
        fi
        pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do
        r=0; wait "$p" || r=$?
        ((r > rc)) && rc=$r
    done
    exit $rc
fi
exec "$@"
"""

PYTHON = r"""#!/bin/bash
# The trainer: --dry-run prints two stage lines (exit FAKE_CHECK_RC); a task records its environment
# and arguments, then FAKE_TRAINER: exit:N, "signal" (exit 75 on SIGUSR1, 1 after 20 s), or "hung"
# (rank 0 found a hang: records 76 in LONGCTX_STATUS_DIR and exits 76; the others were SIGKILLed).
echo "python $*" >>"$FAKE_DIR/calls.log"
if [[ " $* " == *" --dry-run "* ]]; then
    echo "stage short: world 2 = TP 1 x PP 1 x CP 1 x DP 2"
    echo "stage long: world 2 = TP 1 x PP 1 x CP 2 x DP 1"
    exit "${FAKE_CHECK_RC:-0}"
fi
env | sort >"$FAKE_DIR/task.$SLURM_PROCID.env"
printf '%s\n' "$@" >"$FAKE_DIR/task.$SLURM_PROCID.args"
mode=${FAKE_TRAINER:-exit:0}
case $mode in
    exit:*) exit "${mode#exit:}" ;;
    hung)
        if [[ $SLURM_PROCID == 0 ]]; then
            echo "76 no progress in 'step 4' for 10.2 s" >"$LONGCTX_STATUS_DIR/node001.0.exit"
            exit 76
        fi
        exit 137 ;;
    signal)
        trap 'exit 75' USR1
        touch "$FAKE_DIR/task.$SLURM_PROCID.ready"
        for ((t = 0; t < 200; t++)); do sleep 0.1; done
        exit 1 ;;
esac
"""

SCONTROL = r"""#!/bin/bash
# show hostnames: FAKE_HOSTS (space separated); requeue: exit FAKE_REQUEUE_RC.
echo "scontrol $*" >>"$FAKE_DIR/calls.log"
case $1 in
    show) printf '%s\n' ${FAKE_HOSTS:-node001 node002} ;;
    requeue) exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
"""

SQUEUE = r"""#!/bin/bash
# -o %e: FAKE_END (default UNLIMITED); -o %T: FAKE_STATE_<job id>, else "Invalid job id" (exit 1).
echo "squeue $*" >>"$FAKE_DIR/calls.log"
while [[ $# -gt 0 ]]; do
    case $1 in -j) id=$2; shift ;; -o) fmt=$2; shift ;; esac
    shift
done
if [[ $fmt == %e ]]; then echo "${FAKE_END:-UNLIMITED}"; exit 0; fi
var=FAKE_STATE_$id
if [[ -n ${!var+x} ]]; then echo "${!var}"; exit 0; fi
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
"""

SCANCEL = r"""#!/bin/bash
# --signal=USR1: sends SIGUSR1 to the pids recorded in FAKE_PID_GLOB (what SLURM's signal reaches).
echo "scancel $*" >>"$FAKE_DIR/calls.log"
if [[ $* == *--signal=USR1* && -n ${FAKE_PID_GLOB:-} ]]; then
    for f in $FAKE_PID_GLOB; do kill -USR1 "$(cat "$f")" 2>/dev/null; done
fi
exit 0
"""

SBATCH = r"""#!/bin/bash
# Records its arguments and its environment (sbatch.env); prints job id 777.
echo "sbatch $*" >>"$FAKE_DIR/calls.log"
env | sort >"$FAKE_DIR/sbatch.env"
echo 777
"""


@dataclass
class Run:
    """A finished launcher run: exit code, output, the fakes' call log and per-task records."""

    rc: int
    out: str
    dir: Path

    def calls(self, prog: str) -> list[str]:
        log = self.dir / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if line.split(" ", 1)[0] == prog]

    def task_env(self, rank: int) -> dict[str, str]:
        text = (self.dir / f"task.{rank}.env").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def task_args(self, rank: int) -> list[str]:
        return (self.dir / f"task.{rank}.args").read_text().splitlines()


class FakeSlurm:
    """A directory of fakes and a base environment of a 2-node job (id 1234, 2 tasks)."""

    def __init__(self, root: Path):
        self.dir = root / "fake"
        self.bin = self.dir / "bin"
        self.bin.mkdir(parents=True)
        self.run_dir = root / "run"
        for name, text in (
            ("srun", SRUN),
            ("scontrol", SCONTROL),
            ("squeue", SQUEUE),
            ("scancel", SCANCEL),
            ("sbatch", SBATCH),
            ("python", PYTHON),
        ):
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)

    def env(self, **overrides: str) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SRUN_", "LONGCTX_", "MASTER_", "FAKE_"))
        }
        base.update(
            PATH=f"{self.bin}:{os.environ['PATH']}",
            FAKE_DIR=str(self.dir),
            SLURM_JOB_ID="1234",
            SLURM_JOB_NAME="prolong_512k",
            SLURM_NNODES="2",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_CPUS_ON_NODE="16",
            SLURM_JOB_NODELIST="node[001-002]",
            SLURM_SUBMIT_DIR=str(ROOT),
            LONGCTX_CONFIG="examples/tiny_test.yaml",
            LONGCTX_RUN=str(self.run_dir),
            LONGCTX_PYTHON=str(self.bin / "python"),
            LONGCTX_DEVICE="cpu",
        )
        base.update(overrides)
        return base

    def start(self, script: str = "source launch/common.sh; longctx_launch", **env: str):
        (self.dir / "calls.log").unlink(missing_ok=True)
        return subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def finish(self, proc, timeout: float = 30) -> Run:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"launcher still running after {timeout} s:\n{out}") from None
        return Run(proc.returncode, out, self.dir)

    def launch(self, timeout: float = 30, **env: str) -> Run:
        return self.finish(self.start(**env), timeout)

    def wait_for(self, pattern: str, n: int, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while len(list(self.dir.glob(pattern))) < n:
            if time.monotonic() > end:
                raise AssertionError(f"no {n} x {pattern} in {self.dir} after {timeout} s")
            time.sleep(0.05)
