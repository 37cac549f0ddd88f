"""The trainer's wall-clock exit (training/signals.py WallClockDeadline, consulted by
SignalWatcher.agreed once per step) and the one timeout for every process group."""

from __future__ import annotations

import datetime
import signal

import pytest

from megatron_longctx.config.loading import ConfigError
from megatron_longctx.config.schema import TrainingSection
from megatron_longctx.training.signals import SignalWatcher, WallClockDeadline


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_due_once_the_next_step_would_cross_the_margin():
    clock = Clock()
    deadline = WallClockDeadline(end_time=1000.0 + 600, margin_s=300, clock=clock)
    # steps of 50 s: the first call has no estimate; stop once now + 50 >= 1600 - 300 = 1300
    due_at = []
    for _ in range(8):
        if deadline.due():
            due_at.append(clock.t)
        clock.t += 50
    assert due_at[0] == 1250  # 1250 + 50 >= 1300; at 1200, 1200 + 50 < 1300
    assert deadline.step_estimate_s == 50


def test_a_slow_step_moves_the_exit_earlier():
    clock = Clock()
    deadline = WallClockDeadline(end_time=2000.0, margin_s=100, clock=clock)
    deadline.due()
    clock.t += 10
    assert not deadline.due()  # 1010 + 10 < 1900
    clock.t += 500  # one slow step (or a save): 1510 + 500 >= 1900 -> stop now, not after it
    assert deadline.due()


def test_no_end_time_never_due_and_env_parsing():
    off = WallClockDeadline.from_env({})
    assert off.end_time is None and not any(off.due() for _ in range(3))
    d = WallClockDeadline.from_env(
        {"LONGCTX_JOB_END_TIME": "1700000000", "LONGCTX_EXIT_MARGIN_S": "120"}
    )
    assert (d.end_time, d.margin_s) == (1700000000.0, 120.0)
    assert WallClockDeadline.from_env({"SLURM_JOB_END_TIME": "1700000100"}).end_time == 1700000100
    assert WallClockDeadline.from_env({"LONGCTX_JOB_END_TIME": "Unlimited"}).end_time is None


@pytest.fixture
def keep_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_signal_watcher_reports_the_deadline_as_its_reason(keep_signal_handlers):
    clock = Clock()
    watcher = SignalWatcher(deadline=WallClockDeadline(end_time=1000.0, margin_s=60, clock=clock))
    assert watcher.agreed() and watcher.reason.startswith("wall-clock exit: the job ends at")
    far = SignalWatcher(deadline=WallClockDeadline(end_time=1e12, margin_s=60))
    assert not far.agreed()
    far._handle(signal.SIGUSR1, None)
    assert far.agreed() and far.reason.startswith("signal received (SIGUSR1")


def test_one_timeout_for_the_world_group_and_megatrons_groups(monkeypatch):
    """init_process_group's timeout reaches megatron's groups (which default to 30 min)."""
    import torch.distributed
    from megatron.core import parallel_state

    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime import distributed as rt

    seen = {}
    monkeypatch.setattr(rt.cpu_shim, "apply", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda **kw: seen.update(world=kw["timeout"])
    )
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(
        parallel_state,
        "initialize_model_parallel",
        lambda **kw: seen.update(megatron=kw["distributed_timeout_minutes"]),
    )
    monkeypatch.setattr(rt, "_TIMEOUT_S", rt._TIMEOUT_S)
    rt.init_process_group(rt.DistEnv(0, 1, 0, "127.0.0.1", 1), device="cpu", timeout_s=150)
    rt.initialize_model_parallel(ParallelLayout())
    assert seen == {"world": datetime.timedelta(seconds=150), "megatron": 3}  # ceil(150 s)
    assert TrainingSection().dist_timeout_minutes == 30
    with pytest.raises(ConfigError, match="dist_timeout_minutes must be > 0"):
        TrainingSection(dist_timeout_minutes=0)
