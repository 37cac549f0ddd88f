"""The loop's callbacks (OLMo-core's Trainer + callbacks): checkpoint cadence, metrics, faults and
preemption live here, not in the loop. The entry point adds its own (the stage-end evaluation,
eval/stage_end.py) between checkpointing and preemption.

A callback sees the stage (training/state.py's ``StageRun``) and the step's ``StepResult``;
``after_step`` returns an exit code to end the run with (signals.EXIT_*), or None to go on.
Exit codes and what stops a run (signals, the wall-clock deadline, faults): training/signals.py.
"""

from __future__ import annotations

from megatron_longctx.checkpoint.dist import save_checkpoint
from megatron_longctx.runtime.distributed import log0
from megatron_longctx.training.metrics import MetricsLogger, step_record
from megatron_longctx.training.signals import EXIT_PREEMPTED, FaultInjector, SignalWatcher
from megatron_longctx.training.watchdog import HangWatchdog, StepTimes


class Callback:
    """Hooks the stage loop calls; every method is optional."""

    def stage_start(self, run) -> None:
        """After the stage is built and restored, before its first step."""

    def before_step(self, run) -> None:
        """Before the step's micro-batches are read."""

    def after_step(self, run, result) -> int | None:
        """After the optimizer and scheduler stepped (``run.step`` / ``run.iteration`` count it)."""
        return None

    def close(self) -> None:
        """Once, when the run ends (finished, preempted or halted)."""


class Metrics(Callback):
    """One metrics record per step (balance figures + step_record), the PNG at the end. The step
    end (``Preemption``) adds the straggler figures of its collective and writes the record
    (``flush``); without a step end, ``after_step`` writes it."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger
        self.deferred = False  # set by the step end that flushes
        self.pending: dict | None = None

    def stage_start(self, run) -> None:
        self.logger.reset_timer()

    def after_step(self, run, result) -> None:
        # max/mean work across CP and DP ranks and the padding share, then loss, LR, MFU, ...
        record = step_record(run, result, self.logger.seconds_since_last)
        self.pending = run.loader.step_balance() | record
        self.logger.stamp(self.pending)
        if not self.deferred:
            self.flush()

    def flush(self, extra: dict | None = None) -> None:
        if self.pending is not None:
            self.logger.log(self.pending | (extra or {}))
        self.pending = None

    def close(self) -> None:
        self.flush()
        self.logger.plot()
        self.logger.finish()


class Faults(Callback):
    """The test hook (signals.FaultInjector: LONGCTX_FAULT); a no-op in normal runs."""

    def __init__(self, injector: FaultInjector):
        self.injector = injector

    def before_step(self, run) -> None:
        self.injector.before_step(run.iteration + 1, run.chunks)

    def after_step(self, run, result) -> None:
        self.injector.after_step(run.iteration)


class Checkpointing(Callback):
    """Saves every ``stages.N.checkpoint_interval`` (else ``checkpoint.interval``) steps and,
    protected from retention, at every stage's last step. A save is a phase of its own for the
    hang watchdog (its ceiling: no measured step bounds it)."""

    def __init__(self, cfg, resolved: dict, faults: FaultInjector):
        self.section, self.resolved, self.faults = cfg.checkpoint, resolved, faults
        self.saved_at: int | None = None  # the iteration of this run's newest save
        self.watchdog: HangWatchdog | None = None  # set by the step end (Preemption)

    def save(self, run, protected: bool = False) -> None:
        if self.watchdog is not None:
            self.watchdog.arm_long(f"checkpoint save at iteration {run.iteration}")
        save_checkpoint(
            self.section.save_dir,
            run.iteration,
            run.chunks,
            run.optimizer,
            run.scheduler,
            state=run.checkpoint_state(self.resolved),
            keep_last=self.section.keep_last,
            protected=protected,
            before_marker=self.faults.in_save,
        )
        self.saved_at = run.iteration

    def after_step(self, run, result) -> None:
        every = max(1, run.stage.checkpoint_interval or self.section.interval)
        if run.step == run.total:
            self.save(run, protected=True)
        elif run.step % every == 0:
            self.save(run)


class Preemption(Callback):
    """The step end: one collective per step (signals.SignalWatcher.agreed) that carries
    SIGTERM / SIGUSR1 on any rank, the job's wall-clock deadline, and every rank's step times.

    * preemption: checkpoint unless this step already did, then exit EXIT_PREEMPTED (requeue me);
    * straggler figures (watchdog.StepTimes) go into the step's metrics record;
    * the hang watchdog (watchdog.HangWatchdog) is armed for each phase: a stage's first step and
      saves with its ceiling, a step with k x the slowest recent step (the collective's maximum
      over ranks), the step-end collective itself with the bound of a step (or the ceiling when
      this step saved: other ranks may still be writing).
    """

    def __init__(
        self,
        signals: SignalWatcher,
        checkpointing: Checkpointing,
        watchdog: HangWatchdog | None = None,
        metrics: Metrics | None = None,
    ):
        self.signals, self.checkpointing = signals, checkpointing
        self.watchdog, self.metrics = watchdog, metrics
        self.times = StepTimes()
        checkpointing.watchdog = watchdog
        if metrics is not None:
            metrics.deferred = True

    def stage_start(self, run) -> None:
        if self.watchdog is not None:
            self.watchdog.reset_steps()
            self.watchdog.arm_long(f"stage '{run.stage.name}' first step")
        self.times.mark()

    def before_step(self, run) -> None:
        if self.watchdog is not None:
            self.watchdog.arm(f"step {run.iteration + 1}")

    def after_step(self, run, result) -> int | None:
        saved = self.checkpointing.saved_at == run.iteration
        if self.watchdog is not None:
            phase = f"step-end collective of iteration {run.iteration}"
            (self.watchdog.arm_long if saved else self.watchdog.arm)(phase)
        agreed = self.signals.agreed(self.times.local())
        self.times.mark()
        extra = StepTimes.figures(self.signals.arrival, self.signals.cpu)
        if self.watchdog is not None:
            if not saved:  # a save's time is not a step's
                self.watchdog.record_step(extra["step_time_max_s"])
            self.watchdog.arm_long("between steps")
        if self.metrics is not None:
            self.metrics.flush(extra)
        if not agreed:
            return None
        if self.checkpointing.saved_at != run.iteration:
            self.checkpointing.save(run)
        log0(
            f"{self.signals.reason}: checkpoint at iteration {run.iteration} saved; exiting with "
            f"{EXIT_PREEMPTED} so the launcher requeues the job"
        )
        return EXIT_PREEMPTED

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
