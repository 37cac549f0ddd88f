"""The curriculum loop: for each stage, build (training/state.py), restore (checkpoint/start.py),
run (``run_stage``). Everything else is a callback (training/callbacks.py): metrics, faults,
checkpoint cadence, preemption; the entry point adds the stage-end evaluation.

Per step: the micro-batches of this rank's share of the global batch (prepared one step ahead in a
thread, training/prefetch.py), forward/backward through megatron's schedule with a global
token-averaged loss (training/step.py), the NaN policy, the optimizer and LR scheduler step, then
the callbacks in order.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from torch.distributed import get_rank

from megatron_longctx.checkpoint.lineage import for_stage, keep_tokenizer, start_lineage
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
from megatron_longctx.training.prefetch import StepPrefetcher
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

    from megatron_longctx.runtime.distributed import init_process_group

    timeout_s = 60 * cfg.training.dist_timeout_minutes
    device = init_process_group(device=cfg.training.device, timeout_s=timeout_s)
    point = find_start(cfg.stages, cfg.checkpoint.save_dir)
    if get_rank() == 0:
        first = cfg.stages[0].init_from if point.stage_index == 0 else None
        keep_tokenizer(cfg.checkpoint.save_dir, cfg.data.tokenizer_model, first)
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
    rc = run_stages(cfg, point, device, hooks, metrics, config_dir)
    for hook in hooks:
        hook.close()
    return rc


def run_stages(cfg, point, device, hooks, metrics, config_dir=None) -> int:
    """Builds, restores and runs each remaining stage. The previous stage (model, optimizer, DDP
    buffers, loader) is released before the next is built, so a transition holds one stage.
    The source model's facts (checkpoint/lineage.py) are carried into every stage's checkpoints."""
    lineage = start_lineage(point, cfg.stages)
    rc = 0
    for index in range(point.stage_index, len(cfg.stages)):
        run = None  # the previous stage's last reference (callbacks keep none)
        release_memory(device)
        run = build_stage(cfg, index, device, config_dir)
        run.scheduler, run.step = restore(point, run)
        run.iteration, run.metrics = point.iteration, metrics
        run.lineage = lineage = for_stage(lineage, run.stage.seq_length)
        rc = run_stage(run, hooks)
        if rc:
            break
        point = point.after_stage(cfg.checkpoint.save_dir, run.iteration)
    return rc


def release_memory(device) -> None:
    """Returns a released stage's memory: reference cycles collected (megatron's modules and
    optimizer hold some), and on CUDA the caching allocator's free blocks given back."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_stage(run: StageRun, callbacks: list[Callback]) -> int:
    """Steps ``run`` to the end of its stage; returns 0 or the exit code that ended the run."""
    for cb in callbacks:
        cb.stage_start(run)
    # callbacks and checkpoints read the loader's state through it (the step last handed out)
    run.loader = inputs = StepPrefetcher(run.loader, run.shard, run.total - run.step)
    try:
        return _steps(run, callbacks, inputs)
    finally:
        inputs.close()


def _steps(run: StageRun, callbacks: list[Callback], inputs: StepPrefetcher) -> int:
    while run.step < run.total:
        for cb in callbacks:
            cb.before_step(run)
        micro = inputs.next_step()
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
