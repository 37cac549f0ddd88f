"""launch/common.sh at bash level, with stand-ins for the SLURM commands (tests/unit/fake_slurm.py):
what a one-node CPU SLURM cannot show (a second node, GPU binding, a container, a hanging step)
or only slowly (the restart cap). The real-SLURM side is tests/integration/test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.unit.fake_slurm import ROOT, FakeSlurm

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake(tmp_path):
    return FakeSlurm(tmp_path)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def test_srun_lines_carry_cpus_container_and_rendezvous(fake):
    end = int(time.time()) + 3600
    run = fake.launch(
        MASTER_ADDR="login07",
        MASTER_PORT="29500",
        FAKE_END=_iso(end),
        FAKE_GPUS="node",
        LONGCTX_CONTAINER_IMAGE="/images/longctx.sqsh",
        LONGCTX_CONTAINER_MOUNTS="/data:/data",
        LONGCTX_IFNAME="ib0",
    )
    assert run.rc == 0, run.out
    container = [
        "--container-image=/images/longctx.sqsh",
        f"--container-workdir={ROOT}",
        "--container-mounts=/data:/data",
    ]
    check, trainer = run.calls("srun")
    # the config check runs in the container too, as a one-task step
    assert check.split()[1:4] == ["--nodes=1", "--ntasks=1", "--cpus-per-task=1"]
    assert all(flag in check.split() for flag in container) and "--dry-run" in check
    # 16 CPUs on the node / 1 task per node (srun of SLURM 22.05-23.02 ignores sbatch's -c)
    assert "--cpus-per-task=16" in trainer.split() and "--ntasks=2" in trainer.split()
    assert all(flag in trainer.split() for flag in container)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for rank in (0, 1):
        env = run.task_env(rank)
        assert env["MASTER_ADDR"] == "node001"  # the job's first node, not the inherited login07
        assert 10000 <= int(env["MASTER_PORT"]) < low  # below the ephemeral port range
        assert env["SRUN_CPUS_PER_TASK"] == "16"
        assert env["LONGCTX_JOB_END_TIME"] == str(end) and env["LONGCTX_EXIT_MARGIN_S"] == "900"
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
        # each task sees the node's GPUs: LOCAL_RANK = SLURM_LOCALID picks its own
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["LOCAL_RANK"] == str(rank)
        assert "RANK" not in env and "WORLD_SIZE" not in env
    assert "ignoring MASTER_ADDR=login07" in run.out
    port0 = run.task_env(0)["MASTER_PORT"]
    # a requeue of the same job id rendezvouses on another port; per-task GPU binding: each task
    # sees one GPU, LOCAL_RANK 0
    run = fake.launch(SLURM_RESTART_COUNT="1", FAKE_GPUS="task", LONGCTX_GPU_BINDING="task")
    assert run.rc == 0, run.out
    assert "--gpus-per-task=1" in run.calls("srun")[-1].split()
    assert run.task_env(0)["MASTER_PORT"] != port0
    for rank in (0, 1):
        env = run.task_env(rank)
        assert env["CUDA_VISIBLE_DEVICES"] == str(rank) and env["LOCAL_RANK"] == "0"
    assert not (fake.run_dir / "launch" / "lock").exists()  # released at the end


def test_wait_survives_a_step_that_ends_during_the_trap():
    """Issue 17.1: srun ends while the USR1 trap still runs. The loop that stops as soon as
    ``kill -0`` fails reads wait's 138 (128 + SIGUSR1); _wait_step collects the real 75."""
    script = r"""
source launch/common.sh
start() { (sleep 0.5; exit 75) & STEP=$!; (sleep 0.2; kill -USR1 $$) & }
trap 'sleep 1.5' USR1   # a trap (the signalling step) that outlasts the step
start
while true; do rc=0; wait "$STEP" || rc=$?; kill -0 "$STEP" 2>/dev/null || break; done
echo "old loop: $rc"
start
_wait_step "$STEP"
echo "_wait_step: $LONGCTX_STEP_RC"
"""
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    assert "old loop: 138" in out, out  # the race is reproduced
    assert "_wait_step: 75" in out, out


def _signal_when_ready(fake, proc, *signals):
    fake.wait_for("task.*.ready", 2)  # the pid files are written before the trainer starts
    for sig in signals:
        os.kill(proc.pid, sig)
        time.sleep(0.3)


def test_preemption_whose_step_ends_during_the_trap_requeues(fake):
    # the trainer exits 75 at once on SIGUSR1; the signalling step lingers 1 s after that
    proc = fake.start(FAKE_TRAINER="signal", FAKE_FORWARD_DELAY="1", SLURM_GPUS_ON_NODE="8")
    _signal_when_ready(fake, proc, signal.SIGUSR1)
    run = fake.finish(proc)
    assert run.rc == 75, run.out
    assert "(preempted by SIGUSR1)" in run.out and "scontrol requeue 1234" in run.calls("scontrol")
    # the signalling step takes no GPUs (the job has 8 per node), no memory, one CPU
    overlap = run.calls("srun")[-1].split()
    assert {"--overlap", "--gres=none", "--mem=0", "--cpus-per-task=1"} <= set(overlap)
    assert (fake.run_dir / "launch" / "lock").read_text().split()[0] == "1234"  # kept: requeued


def test_sigterm_to_the_batch_shell_is_not_requeued(fake):
    # the pre-timeout USR1, then scancel's SIGTERM while the trainer saves: no requeue
    proc = fake.start(FAKE_TRAINER="signal", FAKE_FORWARD_DELAY="1")
    _signal_when_ready(fake, proc, signal.SIGUSR1, signal.SIGTERM)
    run = fake.finish(proc)
    assert run.rc == 75, run.out
    assert "received SIGTERM (the trainer was asked to checkpoint on SIGUSR1 already)" in run.out
    assert "not requeueing: this job got SIGTERM" in run.out
    assert not any(c.startswith("scontrol requeue") for c in run.calls("scontrol"))
    assert not (fake.run_dir / "launch" / "lock").exists()


def test_restarts_stop_at_the_cap(fake):
    run = fake.launch(FAKE_TRAINER="exit:75", SLURM_RESTART_COUNT="2", LONGCTX_MAX_RESTARTS="3")
    assert run.rc == 75 and "scontrol requeue 1234" in run.calls("scontrol"), run.out
    run = fake.launch(FAKE_TRAINER="exit:75", SLURM_RESTART_COUNT="3", LONGCTX_MAX_RESTARTS="3")
    assert run.rc == 75, run.out
    assert "restart cap reached (3 restarts, LONGCTX_MAX_RESTARTS=3)" in run.out
    assert not any(c.startswith("scontrol requeue") for c in run.calls("scontrol"))


def test_signalling_step_cannot_hang(fake):
    # the helper step never starts (it waits for resources); after LONGCTX_SIGNAL_TIMEOUT_S the
    # launcher signals every step through scancel, which reaches the trainers
    proc = fake.start(
        FAKE_TRAINER="signal",
        FAKE_FORWARD_HANG="1",
        LONGCTX_SIGNAL_TIMEOUT_S="1",
        FAKE_PID_GLOB=str(fake.run_dir / "launch" / "1234" / "*.pid"),
    )
    _signal_when_ready(fake, proc, signal.SIGUSR1)
    start = time.monotonic()
    run = fake.finish(proc, timeout=20)
    assert run.rc == 75, run.out
    assert time.monotonic() - start < 10
    assert "signalling every step instead (scancel --signal=USR1)" in run.out
    assert "scancel --signal=USR1 1234" in run.calls("scancel")
    assert "scontrol requeue 1234" in run.calls("scontrol")


def test_second_job_on_the_run_directory_is_refused(fake):
    lock = fake.run_dir / "launch" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("999 node005 1700000000\n")
    run = fake.launch(FAKE_STATE_999="RUNNING")
    assert run.rc == 4, run.out
    assert f"run directory {fake.run_dir} is in use by job 999 (RUNNING)" in run.out
    assert "--dependency=singleton" in run.out
    assert not run.calls("python") and not run.calls("srun")  # nothing started
    assert lock.read_text().startswith("999 ")
    # the holder has ended (SLURM still lists it as CANCELLED, or no longer knows it): taken over
    for state in ({"FAKE_STATE_999": "CANCELLED"}, {}):
        lock.write_text("999 node005 1700000000\n")
        run = fake.launch(**state)
        assert run.rc == 0 and "taking over the lock of job 999" in run.out, run.out
        assert not lock.exists()


def test_time_limit_inside_the_exit_margin_is_refused(fake):
    run = fake.launch(FAKE_END=_iso(time.time() + 300), LONGCTX_EXIT_MARGIN_S="900")
    assert run.rc == 2 and "Not starting" in run.out, run.out
    assert not run.calls("srun")


def test_evaluation_is_a_dependent_job(fake):
    ckpts = fake.run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest_checkpointed_iteration.txt").write_text("10\n")
    run = fake.launch(LONGCTX_EVAL_JOB="1", LONGCTX_EVAL_SBATCH_ARGS="-p gpu --time=1:00:00")
    assert run.rc == 0, run.out
    # stage-end evaluation leaves the training job (both stages of the config check)
    assert run.task_args(0)[-2:] == ["stages.0.eval=false", "stages.1.eval=false"]
    (sbatch,) = run.calls("sbatch")
    assert sbatch.split()[1:] == [
        "--parsable",
        "--dependency=afterok:1234",
        "--job-name=prolong_512k_eval",
        "-p",
        "gpu",
        "--time=1:00:00",
        f"{ROOT}/launch/eval_longctx.sh",
    ]
    env = dict(
        line.split("=", 1)
        for line in (fake.dir / "sbatch.env").read_text().splitlines()
        if "=" in line
    )
    assert env["LONGCTX_EVAL_CHECKPOINT"] == str(ckpts / "iter_0000010")
    assert env["LONGCTX_EVAL_OUTPUT"] == str(fake.run_dir / "eval" / "iter_0000010")
    assert not any(k.startswith("SLURM_") for k in env)  # the training job's do not leak
    assert "submitted as job 777" in run.out
    # a failed training submits nothing; the evaluation job runs the existing CLI
    assert fake.launch(LONGCTX_EVAL_JOB="1", FAKE_TRAINER="exit:3").calls("sbatch") == []
    run = fake.launch(
        LONGCTX_EVAL_CHECKPOINT=str(ckpts / "iter_0000010"),
        LONGCTX_EVAL_ARGS="--tasks loss --loss-data d/x",
        LONGCTX_PYTHON="true",
        script="source launch/eval_longctx.sh",
    )
    assert run.rc == 0, run.out
    assert run.calls("srun") == [
        f"srun --nodes=1 --ntasks=1 true tools/eval_longctx.py --load {ckpts}/iter_0000010 "
        f"--output-dir {fake.run_dir}/eval/iter_0000010 --tasks loss --loss-data d/x"
    ]


def test_a_hang_found_by_one_rank_requeues_although_srun_reports_the_kill(fake):
    # srun answers the highest task exit code: 137 for the rank that hung and was SIGKILLed; the
    # rank that found the hang recorded 76 (training/watchdog.py record_exit), which decides.
    run = fake.launch(FAKE_TRAINER="hung")
    assert run.rc == 76, run.out
    assert "srun exit 137; node001.0.exit: 76 (no progress in 'step 4' for 10.2 s)" in run.out
    assert "trainer exited 76 (a rank made no progress" in run.out and "requeueing job 1234" in run.out
    assert run.calls("scontrol")[-1] == "scontrol requeue 1234"
    # a plain crash (no record) is still a failure, not requeued
    run = fake.launch(FAKE_TRAINER="exit:137")
    assert run.rc == 137 and "not requeueing" in run.out and "requeueing job" not in run.out
