"""launch/prolong_512k.sh on a real single-node SLURM (slurm_cluster.py), with 2 CPU tasks.

The GPU #SBATCH lines are overridden on the sbatch command line; the recipe is tiny_test.yaml.
* a plain job runs both stages to completion, with checkpoints, metrics and a job log;
* a job preempted twice, once by the trainer's own SIGTERM (test hook LONGCTX_FAULT, dropped by
  launch/common.sh on restarts) and once by the pre-timeout signal path (SIGUSR1 to the batch
  shell only, as `#SBATCH --signal=B:USR1@300` does), requeues itself, resumes, and ends with the
  same loss sequence and bitwise-identical final weights as the plain job;
* a bad config fails fast in the batch shell, a trainer error (NaN) fails in the tasks; neither is
  requeued;
* a job `scancel`led while it trains stays cancelled (the trainer's save-and-exit-75 on SIGTERM is
  not taken for a preemption to requeue);
* with `--time=2` and slow steps, the trainer's wall-clock exit saves before the job's end time
  minus LONGCTX_EXIT_MARGIN_S, without any signal, and the job requeues itself;
* a second job on a run directory that a live job holds is refused, with the reason.
Every job is cancelled in teardown; every wait has a deadline. launch/common.sh's behaviour that a
one-node SLURM cannot show is tested at bash level (tests/unit/test_launch_script.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_longctx.testing.data import tiny_corpus
from tests.integration.run_utils import ROOT, read_model_tensors
from tests.integration.slurm_cluster import ClusterUnavailable, ensure_cluster

CONFIG = ROOT / "examples" / "tiny_test.yaml"
SCRIPT = ROOT / "launch" / "prolong_512k.sh"
TOTAL = 10  # iterations of tiny_test.yaml (6 + 4)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm():
    try:
        return ensure_cluster()
    except ClusterUnavailable as err:
        pytest.skip(f"no SLURM cluster: {err}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("slurm_data"))


class Job:
    """One sbatch submission of launch/prolong_512k.sh; ``info()`` reads scontrol's record."""

    def __init__(self, run_dir: Path, data: dict, sbatch_args: tuple[str, ...] = (), **env: str):
        self.run_dir, self.log = run_dir, run_dir / "job.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("LONGCTX_")}
        full_env = dict(base, LONGCTX_CONFIG=str(CONFIG), LONGCTX_DEVICE="cpu",
                        LONGCTX_RUN=str(run_dir), LONGCTX_DATA=str(Path(data["long"]).parent),
                        LONGCTX_PYTHON=sys.executable, OMP_NUM_THREADS="1",
                        WANDB_MODE="offline", **env)
        # Command-line options override the script's #SBATCH lines (no GPU gres here), and later
        # ones earlier ones (sbatch_args). --time stays well above the trainer's exit margin (900 s)
        # and the script's 600 s pre-timeout signal.
        cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
               "--time=20", f"--output={self.log}", *sbatch_args, str(SCRIPT)]
        p = subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        self.id = p.stdout.strip().split(";")[0]

    def info(self) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True,
                             text=True, timeout=30).stdout
        fields = {k: re.search(rf"\b{k}=(\S+)", out) for k in ("JobState", "Restarts", "ExitCode")}
        return {k: m.group(1) if m else "" for k, m in fields.items()}

    def wait(self, deadline_s: float, on_poll=None) -> dict:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            info = self.info()
            if info["JobState"] in FINAL_STATES:
                return info
            if on_poll:
                on_poll(info)
            time.sleep(0.3)
        self.cancel()
        raise AssertionError(f"job {self.id} still {self.info()} after {deadline_s} s:\n"
                             + self.text()[-4000:])

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no job log)"

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        recs = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return recs

    def losses(self) -> list[tuple[int, float]]:
        return [(r["iteration"], r["loss"]) for r in self.metrics()]


@pytest.fixture
def submit(slurm, data):
    jobs = []

    def _submit(run_dir: Path, sbatch_args: tuple[str, ...] = (), **env: str) -> Job:
        jobs.append(Job(run_dir, data, sbatch_args, **env))
        return jobs[-1]

    yield _submit
    for job in jobs:
        job.cancel()


@pytest.fixture(scope="module")
def reference(slurm, data, tmp_path_factory):
    job = Job(tmp_path_factory.mktemp("slurm_reference"), data)
    try:
        info = job.wait(150)
    finally:
        job.cancel()
    return job, info


@pytest.mark.timeout(200)
def test_job_runs_to_completion(reference):
    job, info = reference
    assert info == {"JobState": "COMPLETED", "Restarts": "0", "ExitCode": "0:0"}, job.text()[-4000:]
    log = job.text()
    assert "2 tasks, master " in log and "device cpu" in log
    assert "stage long: world 2 = TP 1 x PP 1 x CP 2 x DP 1" in log  # the config check
    assert "0: [long] step    4/4 iter   10" in log  # rank-labelled trainer output
    assert "trainer finished (exit 0)" in log
    assert [it for it, _ in job.losses()] == list(range(1, TOTAL + 1))
    ckpts = job.run_dir / "checkpoints"
    assert (ckpts / f"iter_{TOTAL:07d}" / "COMPLETE.json").is_file()
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == str(TOTAL)


@pytest.mark.timeout(300)
def test_preempted_job_requeues_and_matches_uninterrupted(reference, submit, tmp_path):
    ref, ref_info = reference
    assert ref_info["JobState"] == "COMPLETED"
    # Restart 0: rank 0 SIGTERMs itself after iteration 3 -> checkpoint, exit 75, requeue.
    job = submit(tmp_path / "run", LONGCTX_FAULT="term_after_step:3")
    sent = []

    def preempt_restart_1(info):
        # Restart 1 (the fault hook is dropped): once it has trained a step past the resume point,
        # the pre-timeout path: SIGUSR1 to the batch shell only, which forwards it to the tasks.
        if not sent and info["Restarts"] == "1" and info["JobState"] == "RUNNING" and any(
                it > 3 for it, _ in job.losses()):
            subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
            sent.append(time.monotonic())

    info = job.wait(270, on_poll=preempt_restart_1)
    log = job.text()
    assert info == {"JobState": "COMPLETED", "Restarts": "2", "ExitCode": "0:0"}, log[-4000:]
    assert log.count("exited 75 (preempted") == 2, log[-4000:]
    assert "received SIGUSR1" in log and "(preempted by SIGUSR1)" in log
    assert log.count("requeueing job") == 2
    assert "restart 1: dropping test hook LONGCTX_FAULT=term_after_step:3" in log
    assert "resumed stage 'short' at step 3" in log
    # Same loss sequence (bitwise floats) and bitwise-identical final weights.
    assert job.losses() == ref.losses()
    final = read_model_tensors(job.run_dir / "checkpoints" / f"iter_{TOTAL:07d}")
    expected = read_model_tensors(ref.run_dir / "checkpoints" / f"iter_{TOTAL:07d}")
    assert final.keys() == expected.keys() and len(final) > 5
    for k in expected:
        assert torch.equal(final[k], expected[k]), k


@pytest.mark.timeout(120)
def test_bad_config_fails_fast_without_requeue(submit, tmp_path):
    start = time.monotonic()
    job = submit(tmp_path / "run", LONGCTX_OVERRIDES="stages.0.bogus=1")
    info = job.wait(90)
    log = job.text()
    assert info == {"JobState": "FAILED", "Restarts": "0", "ExitCode": "2:0"}, log[-3000:]
    assert "unknown config key(s) stages.0.bogus" in log
    assert "config check failed (exit 2)" in log and "not requeueing" in log
    assert not (job.run_dir / "checkpoints").exists()
    assert time.monotonic() - start < 60


@pytest.mark.timeout(120)
def test_trainer_error_is_not_requeued(submit, tmp_path):
    job = submit(tmp_path / "run", LONGCTX_FAULT="nan_at_step:2")
    info = job.wait(100)
    log = job.text()
    assert info == {"JobState": "FAILED", "Restarts": "0", "ExitCode": "3:0"}, log[-3000:]
    assert "non-finite loss" in log
    assert "trainer failed (exit 3): not requeueing" in log


def _launch_lines(log: str, text: str) -> list[float]:
    """Epoch times of the launcher's log lines that contain ``text``."""
    return [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            for m in re.finditer(r"^\[launch (\S+ \S+)\] (.*)$", log, re.M) if text in m.group(2)]


@pytest.mark.timeout(90)
def test_cancelled_job_stays_cancelled(submit, tmp_path):
    job = submit(tmp_path / "run", LONGCTX_FAULT="slow_steps:1")
    cancelled = []

    def cancel_once_training(info):
        if not cancelled and info["JobState"] == "RUNNING" and job.losses():
            job.cancel()  # SIGTERM to the batch shell and the trainers: they save and exit 75
            cancelled.append(1)

    job.wait(60, on_poll=cancel_once_training)
    end = time.monotonic() + 40  # the batch shell decides within KillWait (20 s)
    while time.monotonic() < end and not re.search(r"trainer (checkpointed|failed)", job.text()):
        time.sleep(0.3)
    time.sleep(1)
    log, info = job.text(), job.info()
    assert cancelled and "received SIGTERM" in log, log[-3000:]
    assert "not requeueing: this job got SIGTERM" in log, log[-3000:]
    assert "requeueing job" not in log
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-3000:]


@pytest.mark.timeout(120)
def test_wall_clock_exit_saves_and_requeues_before_the_time_limit(submit, tmp_path):
    margin = 90  # of --time=2: the trainer must stop ~30 s into the run, between 2 s steps
    job = submit(tmp_path / "run", sbatch_args=("--time=2", "--signal=B:USR1@5"),
                 LONGCTX_FAULT="slow_steps:2", LONGCTX_EXIT_MARGIN_S=str(margin),
                 LONGCTX_OVERRIDES="stages.0.steps=40 stages.0.checkpoint_interval=3 "
                                   "checkpoint.keep_last=20")

    def cancel_once_requeued(info):
        if info["Restarts"] == "1":
            job.cancel()  # seen requeued: its next run is not part of this test

    info = job.wait(100, on_poll=cancel_once_requeued)
    log = job.text()
    assert info["Restarts"] == "1", log[-3000:]
    ends = re.search(r"time limit: the job ends (\S+ \S+) \((\d+) s left\)", log)
    assert ends and int(ends.group(2)) <= 120, log[-3000:]
    end = time.mktime(time.strptime(ends.group(1), "%Y-%m-%d %H:%M:%S"))
    saved = re.search(r"wall-clock exit: the job ends at \S+, next step ~(\d+) s, exit margin "
                      rf"{margin} s: checkpoint at iteration (\d+) saved", log)
    assert saved, log[-3000:]
    iteration = int(saved.group(2))
    assert 1 <= iteration < 40
    # every 3rd step (the stage's checkpoint_interval) and the wall-clock exit's own save
    ckpts = job.run_dir / "checkpoints"
    saved_its = {int(d.name[5:]) for d in ckpts.glob("iter_*") if (d / "COMPLETE.json").is_file()}
    assert saved_its == set(range(3, iteration + 1, 3)) | {iteration}, saved_its
    assert "received SIG" not in log  # no SLURM signal was needed
    (exited,) = _launch_lines(log, "exited 75 (preempted)")
    assert exited < end - 30, (exited, end)  # done before SIGTERM + KillWait at the limit
    # Unless the first step already ended past end - margin (a loaded machine; then there was no
    # earlier step to stop after), the exit is predictive: the slow step is in the estimate, and
    # the save began before end - margin.
    if iteration > 1:
        assert int(saved.group(1)) >= 2, saved.group(0)
        assert exited <= end - margin + 10, (exited, end)
    assert log.count("requeueing job") == 1


@pytest.mark.timeout(200)
def test_second_job_on_the_run_directory_is_refused(submit, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.run(["sbatch", "--parsable", "--ntasks=1", "--time=2", "--output=/dev/null",
                             "--wrap=sleep 170"], capture_output=True, text=True, timeout=30)
    holder_id = holder.stdout.strip().split(";")[0]
    try:
        end = time.monotonic() + 60  # (a previous test's job may still be completing)
        while "JobState=RUNNING" not in subprocess.run(
                ["scontrol", "show", "job", holder_id], capture_output=True, text=True,
                timeout=30).stdout:
            assert time.monotonic() < end, f"holder job {holder_id} did not start"
            time.sleep(0.3)
        (run_dir / "launch").mkdir(parents=True)
        (run_dir / "launch" / "lock").write_text(f"{holder_id} somehost 0\n")
        # the holder has 1 of the 2 CPUs: this job takes the other (not the whole node)
        job = submit(run_dir, sbatch_args=("--ntasks-per-node=1", "--oversubscribe"))
        info = job.wait(90)  # (under load the job may pend a while)
    finally:
        subprocess.run(["scancel", holder_id], capture_output=True, timeout=30)
    log = job.text()
    assert info == {"JobState": "FAILED", "Restarts": "0", "ExitCode": "4:0"}, log[-3000:]
    assert f"is in use by job {holder_id} (RUNNING)" in log and "--dependency=singleton" in log
    assert not (run_dir / "checkpoints").exists()
