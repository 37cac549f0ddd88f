"""The curriculum loop: for each stage, build (training/state.py), restore (checkpoint/start.py),
run (``run_stage``). Everything else is a callback (training/callbacks.py): metrics, faults,
checkpoint cadence, preemption; the entry point adds the stage-end evaluation.

Per step: the micro-batches of this rank's share of the global batch, forward/backward through
megatron's schedule with a global token-averaged loss (training/step.py), the NaN policy, the
optimizer and LR scheduler step, then the callbacks in order.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_longctx.checkpoint.start import find_start, restore
from megatron_longctx.config.schema import ExperimentConfig
from megatron_longctx.runtime.distributed import log0
from megatron_longctx.training.callbacks import (
    Callback,
    Checkpointing,
    Faults,
    Metrics,
    Preemption,
)
from megatron_longctx.training.metrics import MetricsLogger
from megatron_longctx.training.signals import (
    EXIT_NONFINITE,
    FaultInjector,
    SignalWatcher,
    WallClockDeadline,
)
from megatron_longctx.training.state import StageRun, build_stage
from megatron_longctx.training.step import StepResult, forward_backward
from megatron_longctx.training.watchdog import HangWatchdog


def train(
    cfg: ExperimentConfig,
    resolved: dict,
    *,
    config_dir: str | Path | None = None,
    callbacks: list[Callback] = (),
) -> int:
    """Runs (or resumes) the whole curriculum. ``callbacks`` run after checkpointing, before the
    preemption check. Returns the process exit code."""
    from torch.distributed import get_rank

    from megatron_longctx.runtime.distributed import init_process_group

    timeout_s = 60 * cfg.training.dist_timeout_minutes
    device = init_process_group(device=cfg.training.device, timeout_s=timeout_s)
    point = find_start(cfg.stages, cfg.checkpoint.save_dir)
    metrics = MetricsLogger(cfg.logging, resolved, point.iteration)
    if point.stage_index == len(cfg.stages):
        log0(
            f"all {len(cfg.stages)} stages are complete in {cfg.checkpoint.save_dir}; nothing to do"
        )
    faults = FaultInjector()
    saver = Checkpointing(cfg, resolved, faults)
    signals = SignalWatcher(deadline=WallClockDeadline.from_env(), device=device)
    watchdog = HangWatchdog.from_config(cfg.training, cfg.logging.run_dir, get_rank())
    report = Metrics(metrics)
    step_end = Preemption(signals, saver, watchdog, report)  # + straggler figures, hang watchdog
    hooks = [report, Faults(faults), saver, *callbacks, step_end]
    rc = 0
    for index in range(point.stage_index, len(cfg.stages)):
        run = build_stage(cfg, index, device, config_dir)
        run.scheduler, run.step = restore(point, run)
        run.iteration, run.metrics = point.iteration, metrics
        rc = run_stage(run, hooks)
        if rc:
            break
        point = point.after_stage(cfg.checkpoint.save_dir, run.iteration)
    for hook in hooks:
        hook.close()
    return rc


def run_stage(run: StageRun, callbacks: list[Callback]) -> int:
    """Steps ``run`` to the end of its stage; returns 0 or the exit code that ended the run."""
    for cb in callbacks:
        cb.stage_start(run)
    while run.step < run.total:
        for cb in callbacks:
            cb.before_step(run)
        micro = [run.shard(next(run.loader)) for _ in range(run.loader.num_micro_batches)]
        stage = run.stage
        result = forward_backward(
            run.chunks,
            micro,
            seq_length=stage.seq_length,
            micro_batch_size=stage.micro_batch_size,
            optimizer=run.optimizer,
        )
        result.doc_lengths = micro[0]["doc_lengths"].tolist()
        if not update(run, result):
            return EXIT_NONFINITE
        run.scheduler.step(1)
        run.step += 1
        run.iteration += 1
        for cb in callbacks:
            rc = cb.after_step(run, result)
            if rc:
                return rc
    return 0


def update(run: StageRun, result: StepResult) -> bool:
    """The NaN policy and the optimizer step. False: halt without a checkpoint (a non-finite
    loss under ``nan_policy: halt``, or a non-finite gradient norm)."""
    if not math.isfinite(result.loss):
        if run.cfg.training.nan_policy == "halt":
            log0(
                f"non-finite loss {result.loss} at iteration {run.iteration + 1}: halting "
                "without a checkpoint (set training.nan_policy=skip to skip such steps)"
            )
            return False
        result.skipped, result.grad_norm = True, float("nan")
        return True
    _, grad_norm, _ = run.optimizer.step()
    if grad_norm is not None and not math.isfinite(grad_norm):
        log0(f"non-finite grad norm at iteration {run.iteration + 1}: halting, no checkpoint")
        return False
    result.grad_norm = grad_norm
    return True
