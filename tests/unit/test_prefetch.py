"""Issue 27, points 7 and 8: the input pipeline ahead of the device; one stage held at a time.

What replaces the GPU: a simulated device step (a sleep of T seconds in place of
forward/backward, which on a GPU is the Python thread waiting on the device) and, for the host
work, the real loader + batch path, slowed by a sleep per micro-batch so the overlap is measured
on a busy 2-core machine without timing torch. The overlap is asserted through the prefetcher's
own accounting (how long the training thread waited for inputs vs how long preparing them took),
never against a wall-clock threshold. Untested on GPU.
"""

from __future__ import annotations

import time
import weakref
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.parallel.dp_assign import WorkModel
from megatron_longctx.training import loop
from megatron_longctx.training.batch import BatchSharding
from megatron_longctx.training.prefetch import StepPrefetcher
from tests.unit.test_mixture import two_component_spec, write_dataset

S, GB, MBS, STEPS = 32, 8, 2, 6


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    rng = np.random.default_rng(5)
    write_dataset(root / "long", rng.integers(20, 150, 20), seed=1)
    write_dataset(root / "short", rng.integers(1, 30, 80), seed=2)
    spec = two_component_spec(root / "long", root / "short", min_long=S)
    return build_mixture_index(spec, S, GB * 20, vocab_size=1000, cache_dir=root / "cache")


def _loader(index, consumed=0):
    work = WorkModel(2, "balanced")
    return MixtureLoader(index, GB, MBS, 0, 2, work=work, balance=True, consumed_samples=consumed)


SHARD = BatchSharding(cp_size=2, cp_rank=1, sharding="balanced")


def _serial(loader, steps):
    """Today's loop: the micro-batches built in the training thread, step by step."""
    out = []
    for _ in range(steps):
        micro = [SHARD(next(loader)) for _ in range(loader.num_micro_batches)]
        out.append((micro, loader.state_dict(), loader.step_balance()))
    return out


def _same(a: dict, b: dict) -> bool:
    keys = ("tokens", "labels", "loss_mask", "position_ids", "doc_lengths")
    pa, pb = a["packed_seq_params"], b["packed_seq_params"]
    return all(torch.equal(a[k], b[k]) for k in keys) and all(
        torch.equal(getattr(pa, n), getattr(pb, n)) for n in ("cu_seqlens_q", "cu_seqlens_q_padded")
    )


def test_batches_and_resume_state_identical_to_the_serial_loop(index):
    """Point 7: the same micro-batches (balanced DP counts vary per step), and per step the
    loader state a checkpoint saves is the consumed step's, not the prefetched one's; a loader
    restored from it continues with the same batches."""
    want = _serial(_loader(index), STEPS)
    inputs = StepPrefetcher(_loader(index), SHARD, STEPS)
    try:
        for step, (micro, state, balance) in enumerate(want):
            got = inputs.next_step()
            time.sleep(0.02)  # let the thread run ahead: the snapshot must not follow it
            assert len(got) == len(micro) and all(map(_same, got, micro)), step
            assert inputs.state_dict() == state and inputs.step_balance() == balance
            assert inputs.consumed_samples == state["consumed_samples"]
        with pytest.raises(StopIteration):
            inputs.next_step()
    finally:
        inputs.close()
    resumed = _loader(index)
    resumed.load_state_dict(want[2][1])
    again = _serial(resumed, 2)
    assert all(all(map(_same, a[0], b[0])) for a, b in zip(again, want[3:5]))


class _SlowLoader:
    """The real loader with ``delay`` seconds of extra host work per micro-batch."""

    def __init__(self, loader, delay):
        self.loader, self.delay = loader, delay

    def __next__(self):
        time.sleep(self.delay)
        return next(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _run(inputs_for, steps: int, device_s: float) -> tuple[float, float]:
    """(total wait for inputs, total host time) over steps 2.. with a simulated device step."""
    waits, hosts = [], []
    next_step, finish = inputs_for()
    for _ in range(steps):
        wait, host = next_step()
        waits.append(wait)
        hosts.append(host)
        time.sleep(device_s)  # forward/backward on the device
    finish()
    return sum(waits[1:]), sum(hosts[1:])


def test_host_work_hides_behind_the_device_step(index):
    """Point 7: with a device step T longer than the host work H, the training thread waits
    ~H per step without prefetching (a step takes H + T) and ~0 with it (max(H, T))."""
    delay, device_s = 0.03, 0.25  # H ~ 0.03 x micro-batches (1-4) + the real host work

    def serial():
        loader = _SlowLoader(_loader(index), delay)

        def step():
            start = time.perf_counter()
            _ = [SHARD(next(loader)) for _ in range(loader.num_micro_batches)]
            took = time.perf_counter() - start
            return took, took  # the training thread waits for all of the host work

        return step, lambda: None

    def prefetched():
        inputs = StepPrefetcher(_SlowLoader(_loader(index), delay), SHARD, STEPS)

        def step():
            inputs.next_step()
            return inputs.wait_s[-1], inputs.host_s[-1]

        return step, inputs.close

    wait_serial, host_serial = _run(serial, STEPS, device_s)
    wait_ahead, host_ahead = _run(prefetched, STEPS, device_s)
    assert wait_serial == pytest.approx(host_serial)  # serial: every host second is waited for
    assert host_ahead > 0.1 and wait_ahead < 0.25 * host_ahead, (wait_ahead, host_ahead)


def test_close_stops_a_stage_ended_early(index):
    inputs = StepPrefetcher(_loader(index), SHARD, STEPS)
    inputs.next_step()
    inputs.close()
    assert not inputs._thread.is_alive()


STAGE_BYTES = 96 * 2**20


class _Stage:
    def __init__(self):
        self.weights = torch.ones(STAGE_BYTES // 4)  # touched pages: resident
        self.iteration, self.step, self.total = 0, 0, 0
        self.stage = SimpleNamespace(seq_length=8)  # lineage records the trained length


def test_a_transition_holds_one_stage(monkeypatch):
    """Point 8: when the next stage is built, the previous one (model, optimizer, buffers) is
    gone: RSS then is the baseline, not baseline + one stage."""
    built, rss_at_build = [], []
    proc = psutil.Process()

    def build_stage(cfg, index, device, config_dir):
        rss_at_build.append(proc.memory_info().rss)
        alive = [r for r in built if r() is not None]
        built.append(weakref.ref(stage := _Stage()))
        stage.alive_before = len(alive)
        return stage

    point = SimpleNamespace(stage_index=0, iteration=0, resume=None, transition=None)
    point.after_stage = lambda save_dir, iteration: point
    monkeypatch.setattr(loop, "build_stage", build_stage)
    monkeypatch.setattr(loop, "restore", lambda point, run: (None, 0))
    monkeypatch.setattr(loop, "run_stage", lambda run, hooks: 0)
    stages = [SimpleNamespace(init_from=None)] * 3  # a fresh model: no lineage to read
    cfg = SimpleNamespace(stages=stages, checkpoint=SimpleNamespace(save_dir="x"))
    assert loop.run_stages(cfg, point, torch.device("cpu"), [], None) == 0
    assert len(rss_at_build) == 3
    grown = [rss - rss_at_build[0] for rss in rss_at_build[1:]]
    assert all(g < STAGE_BYTES / 2 for g in grown), [g / 2**20 for g in grown]
