"""Issue 18's structure and the loop's callbacks on a stand-in stage (no model): the checkpoint
cadence, the preemption save, the order the loop calls them in."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_longctx.training import callbacks as cb
from megatron_longctx.training import loop
from megatron_longctx.training import signals as sig

TRAINING = Path(loop.__file__).parent


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
            yield node, [p for p in params if p not in ("self", "cls")]


def test_no_function_in_training_takes_more_than_six_parameters():
    wide = [
        f"{path.name}:{node.name} ({len(params)})"
        for path in sorted(TRAINING.glob("*.py"))
        for node, params in _functions(path)
        if len(params) > 6
    ]
    assert wide == []


def test_training_imports_nothing_from_eval():
    found = []
    for path in sorted(TRAINING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith("megatron_longctx.eval")]
    assert found == []


def test_the_stage_loop_fits_on_one_screen():
    assert not hasattr(loop, "_run_stage")
    assert len(inspect.getsource(loop.run_stage).splitlines()) <= 40


class _Run(SimpleNamespace):
    def checkpoint_state(self, resolved):
        return {"stage_step": self.step, "iteration": self.iteration}


def _run(total=5, interval=None):
    stage = SimpleNamespace(name="s", checkpoint_interval=interval)
    return _Run(
        stage=stage, step=0, total=total, iteration=10, chunks=[], optimizer=None, scheduler=None
    )


@pytest.fixture
def saves(monkeypatch):
    calls = []
    monkeypatch.setattr(
        cb,
        "save_checkpoint",
        lambda save_dir, it, *a, protected=False, **k: calls.append((it, protected)),
    )
    return calls


def _checkpointing(interval=2):
    section = SimpleNamespace(save_dir="d", interval=interval, keep_last=2)
    return cb.Checkpointing(SimpleNamespace(checkpoint=section), {}, sig.FaultInjector(""))


def _step(run, hooks):
    run.step += 1
    run.iteration += 1
    return [h.after_step(run, None) for h in hooks]


def test_checkpoint_cadence_and_protected_stage_end(saves):
    run, saver = _run(total=5), _checkpointing(interval=2)
    for _ in range(5):
        _step(run, [saver])
    # every 2 steps of the stage (iterations 12, 14), then the stage's last step, protected
    assert saves == [(12, False), (14, False), (15, True)]
    run2, saves[:] = _run(total=5, interval=3), []
    for _ in range(5):
        _step(run2, [saver])
    assert saves == [(13, False), (15, True)]  # the stage's own interval wins


class _Signals:
    def __init__(self, at):
        self.at, self.calls, self.reason = at, 0, "test"

    def agreed(self, step_times=None):  # one rank: its own times are the step-end table
        self.calls += 1
        self.arrival, self.cpu = [step_times[0]], [step_times[1]]
        return self.calls == self.at


@pytest.mark.parametrize("at, expect", [(1, [(11, False)]), (2, [(12, False)])])
def test_preemption_saves_once_and_exits_75(saves, at, expect):
    run, saver = _run(total=5), _checkpointing(interval=2)
    hooks = [saver, cb.Preemption(_Signals(at), saver)]
    codes = [_step(run, hooks)[-1] for _ in range(at)]
    # step 2 was already saved by the cadence: the preemption does not save it twice
    assert saves == expect and codes[-1] == sig.EXIT_PREEMPTED and codes[:-1] == [None] * (at - 1)


class _Loader:
    num_micro_batches = 1
    consumed_samples = 0

    def __next__(self):
        return {}

    def state_dict(self):
        return {}

    def step_balance(self):
        return {}


class _Optimizer:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1
        return True, 0.5, None


def _loop_run(loss, nan_policy="halt", total=3):
    import torch

    from megatron_longctx.training.step import StepResult

    micro = {"doc_lengths": torch.tensor([3, 1])}
    result = StepResult(loss=loss, num_tokens=4)
    run = SimpleNamespace(
        stage=SimpleNamespace(seq_length=4, micro_batch_size=1),
        step=0,
        total=total,
        iteration=0,
        chunks=[],
        optimizer=_Optimizer(),
        scheduler=SimpleNamespace(step=lambda n: None),
        loader=_Loader(),
        shard=SimpleNamespace(host=lambda m: micro, to_device=lambda m: m),
        cfg=SimpleNamespace(training=SimpleNamespace(nan_policy=nan_policy)),
    )
    return run, result


class _Hook(cb.Callback):
    def __init__(self, name, events, stop_at=None):
        self.name, self.events, self.stop_at = name, events, stop_at

    def stage_start(self, run):
        self.events.append(("start", self.name))

    def before_step(self, run):
        self.events.append(("before", self.name, run.iteration))

    def after_step(self, run, result):
        self.events.append(("after", self.name, run.iteration, result.grad_norm))
        return sig.EXIT_PREEMPTED if run.iteration == self.stop_at else None


def test_run_stage_calls_hooks_in_order_and_stops_on_an_exit_code(monkeypatch):
    run, result = _loop_run(1.0)
    monkeypatch.setattr(loop, "forward_backward", lambda *a, **k: result)
    events = []
    rc = loop.run_stage(run, [_Hook("a", events), _Hook("b", events, stop_at=2)])
    assert rc == sig.EXIT_PREEMPTED and run.step == 2 and result.doc_lengths == [3, 1]
    assert events == [
        ("start", "a"),
        ("start", "b"),
        ("before", "a", 0),
        ("before", "b", 0),
        ("after", "a", 1, 0.5),
        ("after", "b", 1, 0.5),
        ("before", "a", 1),
        ("before", "b", 1),
        ("after", "a", 2, 0.5),
        ("after", "b", 2, 0.5),
    ]


def test_nan_policy(monkeypatch):
    run, result = _loop_run(float("nan"), "halt")
    monkeypatch.setattr(loop, "forward_backward", lambda *a, **k: result)
    events = []
    assert loop.run_stage(run, [_Hook("a", events)]) == sig.EXIT_NONFINITE
    assert run.step == 0 and run.optimizer.steps == 0 and events[-1] == ("before", "a", 0)
    run, result = _loop_run(float("nan"), "skip")
    monkeypatch.setattr(loop, "forward_backward", lambda *a, **k: result)
    assert loop.run_stage(run, []) == 0
    assert run.step == 3 and run.optimizer.steps == 0 and result.skipped
