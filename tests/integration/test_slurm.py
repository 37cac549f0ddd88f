"""launch/prolong_512k.sh on a real single-node SLURM (slurm_cluster.py), with 2 CPU tasks.

The GPU #SBATCH lines are overridden on the sbatch command line; the recipe is tiny_test.yaml.
* a plain job runs both stages to completion, with checkpoints, metrics and a job log;
* a job preempted twice, once by the trainer's own SIGTERM (test hook LONGCTX_FAULT, dropped by
  launch/common.sh on restarts) and once by the pre-timeout signal path (SIGUSR1 to the batch
  shell only, as `#SBATCH --signal=B:USR1@300` does), requeues itself, resumes, and ends with the
  same loss sequence and bitwise-identical final weights as the plain job;
* a bad config fails fast in the batch shell, a trainer error (NaN) fails in the tasks; neither is
  requeued.
Every job is cancelled in teardown; every wait has a deadline.
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

from tests.integration.data import tiny_corpus
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

    def __init__(self, run_dir: Path, data: dict, **env: str):
        self.run_dir, self.log = run_dir, run_dir / "job.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("LONGCTX_")}
        full_env = dict(base, LONGCTX_CONFIG=str(CONFIG), LONGCTX_DEVICE="cpu",
                        LONGCTX_RUN=str(run_dir), LONGCTX_DATA=str(Path(data["long"]).parent),
                        LONGCTX_PYTHON=sys.executable, OMP_NUM_THREADS="1",
                        WANDB_MODE="offline", **env)
        # Command-line options override the script's #SBATCH lines (no GPU gres here). --time stays
        # well above the script's 300 s pre-timeout signal.
        cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
               "--time=15", f"--output={self.log}", str(SCRIPT)]
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

    def _submit(run_dir: Path, **env: str) -> Job:
        jobs.append(Job(run_dir, data, **env))
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
