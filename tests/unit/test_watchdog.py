"""The hang watchdog and the straggler figures (training/watchdog.py) and the step-end collective
that feeds both (signals.SignalWatcher.agreed).

* the bound: k x the slowest recent step, clamped to [floor, ceiling]; the ceiling with no step
  measured; a new stage measures again (hand-computed values, a fake clock);
* firing: the stacks of all threads go to <run_dir>/hang/rank<N>.txt, the launcher's status file
  gets 76, the exit function gets EXIT_HUNG;
* for real, on 2 gloo processes: rank 1 freezes (sleeps) before a collective; rank 0's watchdog
  thread fires while rank 0's main thread is blocked in the all-reduce (gloo releases the GIL), and
  its stack file shows the frame it was stuck in. The same run checks the step-end collective's
  per-rank table (arrival and CPU times) and the straggler figures on both ranks.
"""

from __future__ import annotations

import time

import pytest

from megatron_longctx.testing.distributed import run_distributed
from megatron_longctx.training.watchdog import EXIT_HUNG, HangBounds, HangWatchdog, StepTimes


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bound_is_k_times_the_slowest_recent_step_clamped(tmp_path):
    clock = Clock()
    wd = HangWatchdog(tmp_path, bounds=HangBounds(4, 10, 60, window=3), clock=clock,
                      exit_fn=lambda code: None)
    assert wd.bound_s() == 60  # nothing measured: the ceiling
    wd.record_step(1.0)
    assert wd.bound_s() == 10  # 4 x 1 s under the floor
    for s in (2.0, 5.0, 3.0):
        wd.record_step(s)
    assert wd.bound_s() == 20  # 4 x max(2, 5, 3)
    wd.record_step(20.0)
    assert wd.bound_s() == 60  # 80 s over the ceiling
    for s in (3.0, 3.0, 3.0):  # the window forgets the 20 s step
        wd.record_step(s)
    assert wd.bound_s() == 12

    wd.arm("step 5")
    clock.t += 11.9
    assert not wd.overdue()
    clock.t += 0.2
    assert wd.overdue()
    wd.arm_long("checkpoint save")  # a save: the ceiling
    clock.t += 59
    assert not wd.overdue()
    wd.disarm()
    clock.t += 1000
    assert not wd.overdue()
    wd.reset_steps()  # a new stage
    assert wd.bound_s() == 60
    wd.stop()


def test_fire_writes_stacks_and_status_and_exits_76(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_STATUS_DIR", str(tmp_path))
    codes = []
    clock = Clock()
    wd = HangWatchdog(tmp_path / "run", rank=3, bounds=HangBounds(2, 1, 5), clock=clock,
                      exit_fn=codes.append)
    wd.record_step(0.75)
    wd.arm("step 7")
    clock.t += 1.5
    wd.fire()
    assert codes == [EXIT_HUNG] == [76]
    text = (tmp_path / "run" / "hang" / "rank00003.txt").read_text()
    assert text.startswith("hang watchdog (rank 3): no progress in 'step 7' for 1.5 s (bound 1.5 s")
    assert "test_fire_writes_stacks_and_status_and_exits_76" in text  # this thread's frame
    (status,) = tmp_path.glob("*.3.exit")
    assert status.read_text().startswith("76 no progress in 'step 7'")


def test_off_with_factor_zero(tmp_path):
    wd = HangWatchdog(tmp_path, bounds=HangBounds(factor=0), exit_fn=lambda code: None)
    wd.arm("step 1", 0.0)
    time.sleep(0.01)
    assert not wd.overdue() and wd._thread is None


def test_straggler_figures():
    # 4 ranks: rank 2 arrives last (median arrival 1.15), rank 1 computed longest (median 0.75)
    fig = StepTimes.figures([1.0, 1.1, 1.6, 1.2], [0.7, 0.9, 0.6, 0.8])
    assert fig["step_time_max_s"] == 1.6 and fig["straggler_rank"] == 2
    assert fig["straggler_lag_s"] == pytest.approx(1.6 - 1.15)
    assert fig["cpu_straggler_rank"] == 1 and fig["cpu_lag_s"] == pytest.approx(0.9 - 0.75)


def _frozen_peer(rank, world, run_dir):
    import torch
    import torch.distributed as dist

    from megatron_longctx.training.signals import SignalWatcher

    # (no __init__: it pre-starts megatron's checkpoint helper, which is not under test here)
    watcher = SignalWatcher.__new__(SignalWatcher)
    watcher.received, watcher.deadline, watcher.device = None, None, torch.device("cpu")
    # the step-end table: each rank contributes its own (arrival, cpu)
    assert not watcher.agreed((1.0 + rank, 0.25 * rank))
    table = (watcher.arrival, watcher.cpu, StepTimes.figures(watcher.arrival, watcher.cpu))

    fired = []
    wd = HangWatchdog(run_dir, rank=rank, bounds=HangBounds(1, 0.3, 0.3), poll_s=0.05,
                      exit_fn=lambda code: fired.append((code, time.monotonic())))
    if rank == 1:
        time.sleep(4.0)  # frozen: rank 0 waits in the all-reduce below
    else:
        wd.arm("all-reduce with a frozen peer")
    x = torch.ones(4)
    dist.all_reduce(x)  # rank 0 blocks here ~4 s
    returned = time.monotonic()
    wd.stop()
    return table, fired, returned


@pytest.mark.timeout(300)
def test_watchdog_fires_while_the_main_thread_waits_in_a_collective(tmp_path):
    results = run_distributed(_frozen_peer, world_size=2, args=(str(tmp_path),), timeout=240)
    for table, _, _ in results:
        assert table[0] == [1.0, 2.0] and table[1] == [0.0, 0.25]
        assert table[2]["straggler_rank"] == 1 and table[2]["straggler_lag_s"] == 0.5
        assert table[2]["cpu_straggler_rank"] == 1
    (_, fired0, returned0), (_, fired1, _) = results
    assert fired1 == []  # rank 1 was never armed
    assert len(fired0) == 1 and fired0[0][0] == 76
    assert fired0[0][1] < returned0  # fired while the main thread was still in the collective
    text = (tmp_path / "hang" / "rank00000.txt").read_text()
    assert "no progress in 'all-reduce with a frozen peer'" in text
    assert "all_reduce" in text and "_frozen_peer" in text  # the main thread's stack


def test_peer_failure_exits_76_and_a_crash_stops_the_watchdog(tmp_path, monkeypatch):
    import megatron_longctx.training.watchdog as wd_mod
    from megatron_longctx.training.signals import exit_on_peer_failure

    monkeypatch.setenv("LONGCTX_STATUS_DIR", str(tmp_path))
    codes = []
    monkeypatch.setattr(wd_mod, "exit_now", codes.append)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.77.0.12]")
    exit_on_peer_failure(gloo)
    assert codes == [76]
    (status,) = tmp_path.glob("*.0.exit")
    assert status.read_text() == "76 a collective failed: a peer is gone\n"

    wd = HangWatchdog(tmp_path, bounds=HangBounds(1, 1, 1), exit_fn=codes.append)
    wd.arm("step 1")
    exit_on_peer_failure(ValueError("a bug"))  # not a peer: returns, the caller re-raises
    assert codes == [76] and not wd.overdue() and wd._stop.is_set()
