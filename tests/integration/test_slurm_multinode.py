"""launch/prolong_512k.sh across nodes of a real multi-node SLURM (megatron_longctx/testing/
slurm_net.py: a controller and 3 one-CPU nodes, each in its own network namespace on a private
bridge), one rank per node, CP 2 across the nodes (the ring exchange and the gradient all-reduce
cross the bridge), on CPU with gloo (what replaces NCCL and the GPUs here).

One 2-node job (one test, to keep the suite's budget: every run of the trainer costs its start-up)
runs one rank per node (rendezvous on the first node, traffic over the second node's link), and
survives three faults, each in a later run of the same job id, and still ends with the losses and
final weights of a one-node 2-rank torchrun run, bitwise:
  1. SIGSTOP of rank 1's trainer (a frozen process): rank 0's hang watchdog finds it within its
     bound, writes its stacks to <run>/hang/, exits 76; the launcher requeues;
  2. the node of rank 1 dies (kill -9 of its slurmd, slurmstepd and task): rank 0's collective
     fails, it exits 76, the job is requeued and runs on the remaining nodes;
  3. the link of rank 1's node is cut: rank 0 waits silently in a collective; the watchdog finds
     it; SLURM marks the node down; the job is requeued and runs on the nodes left.
Every job is cancelled and the cluster torn down (by PID) in teardown; every wait has a deadline.
The durations of each phase are printed (-s) for launch/README.md's table; none is asserted.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_longctx.testing.data import tiny_corpus
from megatron_longctx.testing.slurm_install import ClusterUnavailable
from megatron_longctx.testing.slurm_net import start_cluster
from tests.integration.run_utils import launch, metrics, read_model_tensors
from tests.integration.slurm_net_jobs import NetJob, cp2_recipe

pytestmark = pytest.mark.slurm
STEPS = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = start_cluster(tmp_path_factory.mktemp("slurm_net"))
    except ClusterUnavailable as err:
        pytest.skip(f"no multi-node SLURM test cluster: {err}")
    yield c
    c.teardown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("slurm_net_data"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return cp2_recipe(tmp_path_factory.mktemp("slurm_net_recipe") / "cp2.yaml", steps=STEPS)


@pytest.fixture(scope="module")
def reference(recipe, data, tmp_path_factory):
    """The same recipe on one host: torchrun, 2 ranks (no SLURM)."""
    run = tmp_path_factory.mktemp("slurm_net_reference")
    p = launch(recipe, run, data, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    losses = [(r["iteration"], r["loss"]) for r in metrics(run)]
    assert [it for it, _ in losses] == list(range(1, STEPS + 1))
    return losses, read_model_tensors(run / "checkpoints" / f"iter_{STEPS:07d}")


@pytest.fixture
def jobs():
    submitted = []
    yield submitted
    for job in submitted:
        job.cancel()


def _assert_same_weights(run_dir: Path, expected: dict) -> None:
    final = read_model_tensors(run_dir / "checkpoints" / f"iter_{STEPS:07d}")
    assert final.keys() == expected.keys() and len(final) > 5
    for k in expected:
        assert torch.equal(final[k], expected[k]), k


def _this_run(log: str, restart: int) -> str:
    """The part of the job log written by run ``restart`` of the job."""
    starts = {int(m.group(1)): m.start() for m in re.finditer(
        r"^\[launch [^]]+\] job \d+ \(\S+\) restart (\d+):", log, re.M)}
    if restart not in starts:
        return ""
    return log[starts[restart]:starts.get(restart + 1, len(log))]


def _nodes(run_log: str) -> set[str]:
    """The hosts of a run's launcher line 'N node(s) [n[1,3]]' (n1 / n[1-2] / n[1,3] forms)."""
    text = re.search(r"node\(s\) \[(.+)\], \d+ tasks", run_log).group(1)
    m = re.fullmatch(r"(\w+?)\[([\d,-]+)\]", text)
    if not m:
        return set(text.split(","))
    out = set()
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out |= {f"{m.group(1)}{i}" for i in range(int(lo), int(hi or lo) + 1)}
    return out


@pytest.mark.timeout(1500)
def test_two_node_job_survives_hang_node_death_and_cut_bitwise(cluster, recipe, data, reference,
                                                               jobs, tmp_path):
    before = cluster.link_bytes("n2")
    job = NetJob(cluster, recipe, tmp_path / "run", Path(data["long"]).parent)
    jobs.append(job)
    faults: dict[int, dict] = {}  # restart -> what was done to which node, and when
    killed: list[str] = []
    first_run_tasks: list[tuple[str, int] | None] = []

    def inject(info):
        restarts = int(info["Restarts"] or 0)
        now = time.monotonic()
        for r, f in faults.items():  # when each fault's run was requeued / resumed
            if restarts > r:
                f.setdefault("requeued", now)
            if restarts > r and re.search(r"\] step ", _this_run(job.text(), r + 1)):
                f.setdefault("resumed", now)
        if killed and _this_run(job.text(), 2) and cluster.daemon_pid(
                killed[0]) not in cluster.pids_in(killed[0]):
            # once run 2 has its nodes, the dead node comes back (ReturnToService=1)
            cluster.start_slurmd(killed[0])
        if "resumed" in faults.get(2, {}) and "restored" not in faults[2]:
            # the link comes back once run 3 trains (before, the cut-off rank's own watchdog
            # has ended it: 10 s without progress)
            cluster.set_link(faults[2]["host"], True)
            faults[2]["restored"] = now
        if restarts in faults or restarts > 2 or info["JobState"] != "RUNNING":
            return
        # fault once this run has trained a step past a checkpoint (the first run: iteration 3,
        # after the save at 2; later runs resumed from one)
        its = [int(i) for i in re.findall(r"\] step +\d+/\d+ iter +(\d+)",
                                          _this_run(job.text(), restarts))]
        if not its or (restarts == 0 and max(its) < 3):
            return
        task = job.task(1)
        if task is None:
            return
        host, pid = task
        if restarts == 0:
            first_run_tasks.extend([job.task(0), task])
        faults[restarts] = {"host": host, "at": now}
        if restarts == 0:
            os.kill(pid, signal.SIGSTOP)  # a frozen rank
        elif restarts == 1:
            killed.append(host)
            assert cluster.kill_node(host)  # slurmd, slurmstepd, the task
        else:
            cluster.set_link(host, False)  # the node is cut off

    try:
        info = job.wait(1200, on_poll=inject)
    finally:
        for node in cluster.nodes:
            cluster.set_link(node, True)
    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "3", log[-6000:]
    assert sorted(faults) == [0, 1, 2], faults
    # the first run: one rank per node, CP 2 across them, rendezvous on the first node
    run0 = _this_run(log, 0)
    assert "2 node(s) [n[1-2]], 2 tasks, master n1:" in run0
    assert "world 2 = TP 1 x PP 1 x CP 2 x DP 1" in run0
    assert [t[0] for t in first_run_tasks] == ["n1", "n2"], first_run_tasks
    # 1. the frozen rank: found by rank 0's watchdog within its bound, stacks written, requeued
    hang = re.search(r"hang watchdog \(rank 0\): no progress in '([^']+)' for ([\d.]+) s "
                     r"\(bound ([\d.]+) s", run0)
    assert hang, run0[-4000:]
    assert float(hang.group(2)) <= float(hang.group(3)) + 1.5  # (the thread looks every 1 s)
    stacks = (job.run_dir / "hang" / "rank00000.txt").read_text()  # (restart 0: no suffix)
    assert "Thread" in stacks and "train.py" in stacks
    assert "trainer exited 76 (a rank made no progress" in run0 and "requeueing job" in run0
    # 2. the dead node: the job ran again, on nodes without it
    run1, run2 = _this_run(log, 1), _this_run(log, 2)
    assert "a collective failed because another rank is gone" in run1, run1[-4000:]
    # requeued by the launcher (exit 76), or by SLURM when it found the node dead first
    assert "requeueing job" in run1 or "DUE TO NODE FAILURE" in run1, run1[-4000:]
    dead = faults[1]["host"]
    assert dead not in _nodes(run2), run2[:300]
    # 3. the cut link: the job ran again without that node
    run3 = _this_run(log, 3)
    assert faults[2]["host"] not in _nodes(run3), run3[:300]
    assert "trainer finished (exit 0)" in run3
    # the interrupted job ends where the uninterrupted one did, bit for bit
    losses, expected = reference
    assert job.losses() == losses
    _assert_same_weights(job.run_dir, expected)
    # the last run alone (on n1, n2) all-reduced the fp32 gradients over n2's link 8 times
    param_bytes = sum(t.numel() * 4 for t in expected.values())
    crossed = cluster.link_bytes("n2") - before
    assert crossed > (STEPS - 2) * param_bytes, (crossed, param_bytes)
    recs = job.metrics()
    assert {r["straggler_rank"] for r in recs} <= {0, 1}
    assert all(r["step_time_max_s"] > 0 and r["straggler_lag_s"] >= 0 for r in recs)
    for r, f in sorted(faults.items()):
        print(f"fault {r} ({['SIGSTOP', 'node death', 'link cut'][r]} on {f['host']}): requeued "
              f"after {f.get('requeued', float('nan')) - f['at']:.1f} s, training again after "
              f"{f.get('resumed', float('nan')) - f['at']:.1f} s")
