"""What stops a run between steps: signals, the job's wall-clock deadline, injected faults; and
the exit codes that tell the launcher what happened.

Exit codes a launcher can act on (launch/common.sh requeues on EXIT_PREEMPTED only):
  0  finished;  EXIT_PREEMPTED (75) checkpoint saved after SIGTERM/SIGUSR1 or before the job's
  time limit (WallClockDeadline), requeue me;
  EXIT_NONFINITE (3) NaN/inf loss or grad norm, nothing checkpointed after it; 2 config error;
  EXIT_HUNG (76, training/watchdog.py) no progress within the hang bound, or a collective failed
  because a peer is gone: stacks in <run_dir>/hang/, nothing saved, requeue me (resume from the
  newest complete checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_longctx.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_NONFINITE = 3
EXIT_CONFIG = 2

DEFAULT_EXIT_MARGIN_S = 900.0  # launch/common.sh: LONGCTX_EXIT_MARGIN_S


class WallClockDeadline:
    """Stop (checkpoint, exit EXIT_PREEMPTED) before the job's time limit, on the trainer's clock.

    SLURM's own warning (``--signal=B:USR1@600``) and the SIGTERM at the limit (then SIGKILL after
    KillWait, 30 s by default) leave at most one step's time to a trainer that checks between
    steps; a 512K step is about a minute. ``due()`` (called once per step, after it) is True once
    the next step would end within ``margin_s`` of ``end_time``, with the next step's length taken
    as the longest of the last few intervals between calls (a step, plus any save in it). The first
    call has no interval yet: it compares the time itself.

    Args:
        end_time: the job's end time, seconds since the epoch (None: no deadline, ``due()`` is
            always False).
        margin_s: how long before ``end_time`` the checkpoint must have started.
        clock: time source (tests).
    """

    def __init__(
        self,
        end_time: float | None,
        margin_s: float = DEFAULT_EXIT_MARGIN_S,
        clock=time.time,
        window: int = 8,
    ):
        self.end_time, self.margin_s, self.clock = end_time, float(margin_s), clock
        self._last: float | None = None
        self._intervals: list[float] = []
        self._window = window

    @classmethod
    def from_env(cls, environ=None) -> WallClockDeadline:
        """``LONGCTX_JOB_END_TIME`` (set by launch/common.sh from squeue) or SLURM's own
        ``SLURM_JOB_END_TIME`` (newer SLURM), and ``LONGCTX_EXIT_MARGIN_S``; no end time: off."""
        env = os.environ if environ is None else environ
        raw = env.get("LONGCTX_JOB_END_TIME") or env.get("SLURM_JOB_END_TIME") or ""
        try:
            end = float(raw) if raw else None
        except ValueError:
            logger.warning("ignoring job end time %r (not seconds since the epoch)", raw)
            end = None
        margin = float(env.get("LONGCTX_EXIT_MARGIN_S") or DEFAULT_EXIT_MARGIN_S)
        return cls(end if end and end > 0 else None, margin)

    @property
    def step_estimate_s(self) -> float:
        return max(self._intervals, default=0.0)

    def due(self) -> bool:
        now = self.clock()
        if self._last is not None:
            self._intervals = (self._intervals + [now - self._last])[-self._window :]
        self._last = now
        if self.end_time is None:
            return False
        return now + self.step_estimate_s >= self.end_time - self.margin_s

    def describe(self) -> str:
        end = time.strftime("%H:%M:%S", time.localtime(self.end_time or 0))
        return (
            f"wall-clock exit: the job ends at {end}, next step ~{self.step_estimate_s:.0f} s, "
            f"exit margin {self.margin_s:.0f} s"
        )


class SignalWatcher:
    """Records SIGTERM / SIGUSR1 on this rank; ``agreed()`` is a collective OR over all ranks.

    SLURM signals every process of a job on preemption, including the helper process megatron's
    checkpoint writer starts (a multiprocessing manager); killed mid-save, it breaks the save we
    are about to make. So the helper is started here, once, with those signals ignored (an
    ignored disposition survives the helper's exec), before our handlers are installed.


    ``deadline`` (a WallClockDeadline) is consulted in the same collective: ``agreed()`` is also
    True when any rank finds the deadline due; ``reason`` then says which of the two it was.
    """

    def __init__(
        self,
        signals=(signal.SIGTERM, signal.SIGUSR1),
        deadline: WallClockDeadline | None = None,
        device: torch.device | str = "cpu",
    ):
        self.received: int | None = None
        self.device = torch.device(device)  # the training device: NCCL reduces CUDA tensors only
        self.deadline = deadline
        self.reason = ""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
        try:
            from megatron.core.dist_checkpointing.strategies import filesystem_async

            filesystem_async._get_write_results_queue()
        except (ImportError, AttributeError):  # another megatron version: nothing to pre-start
            pass
        finally:
            for sig in previous:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self, step_times: tuple[float, float] | None = None) -> bool:
        """The step-end collective (one all-reduce): signal / deadline flags, and, with
        ``step_times`` (this rank's watchdog.StepTimes.local()), every rank's step times, kept in
        ``self.arrival`` / ``self.cpu`` (lists indexed by rank) for the straggler figures and the
        hang watchdog's bound."""
        due = self.deadline is not None and self.deadline.due()
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        n = world if step_times is not None else 0
        host = [float(self.received is not None), float(due)] + [0.0] * (2 * n)
        if n:  # each rank fills its own slots; MAX over ranks assembles the table
            host[2 + rank], host[2 + n + rank] = max(step_times[0], 0.0), max(step_times[1], 0.0)
        flag = torch.tensor(host, dtype=torch.float64, device=self.device)  # one host->device copy
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        values = flag.tolist()
        got_signal, deadline_due = bool(values[0]), bool(values[1])
        self.arrival, self.cpu = values[2 : 2 + n], values[2 + n :]
        if got_signal:
            name = signal.Signals(self.received).name if self.received else "a signal"
            self.reason = f"signal received ({name} on this rank or another)"
        elif deadline_due:
            self.reason = self.deadline.describe()
        return got_signal or deadline_due


def exit_on_peer_failure(err: BaseException) -> None:
    """Called with an exception that ended training: if it is a collective that failed because
    another rank is gone (its process killed, its node down, its network cut: gloo's "Connection
    reset/closed by peer", c10d's DistError family), writes this rank's stacks and ends the
    process with watchdog.EXIT_HUNG (the launcher requeues; the run resumes from the newest
    complete checkpoint). Any other exception: stops the hang watchdog and returns (the caller
    re-raises it)."""
    from megatron_longctx.training.watchdog import EXIT_HUNG, exit_now, record_exit, stop_all

    text = f"{type(err).__name__}: {err}"
    dist_error = getattr(dist, "DistError", ())
    peer_gone = ("by peer", "Connection refused", "Broken pipe", "Socket Timeout", "timed out")
    if not (isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(
            s in text for s in peer_gone))):
        stop_all()  # a crash: its shutdown is no hang, and no reason to requeue
        return
    import traceback

    traceback.print_exception(err)
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"rank {rank}: a collective failed because another rank is gone ({text.strip()[:300]}); "
          f"exiting {EXIT_HUNG} so the launcher requeues the job", file=sys.stderr, flush=True)
    record_exit(EXIT_HUNG, "a collective failed: a peer is gone", rank)
    exit_now(EXIT_HUNG)  # Python's shutdown would wait on the process group's threads


class FaultInjector:
    """Test hook: ``LONGCTX_FAULT=kill_after_step:N`` / ``kill_in_save:N`` / ``nan_at_step:N`` /
    ``term_after_step:N`` makes global rank 0 really SIGKILL / SIGTERM itself, or poisons a weight
    with NaN, at iteration N; ``slow_steps:S`` makes every step S seconds longer on every rank (a
    slow step, for the wall-clock deadline). Unset in normal runs (then every method is a no-op)."""

    def __init__(self, spec: str | None = None):
        spec = spec if spec is not None else os.environ.get("LONGCTX_FAULT", "")
        self.kind, self.at = (spec.split(":") + [""])[:2] if spec else ("", "")
        self.at = int(self.at) if self.at else -1
        self.rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0

    def after_step(self, iteration: int) -> None:
        if self.rank0 and iteration == self.at and self.kind == "kill_after_step":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.rank0 and iteration == self.at and self.kind == "term_after_step":
            os.kill(os.getpid(), signal.SIGTERM)

    def in_save(self, iteration: int) -> None:
        if self.rank0 and iteration == self.at and self.kind == "kill_in_save":
            os.kill(os.getpid(), signal.SIGKILL)

    def before_step(self, iteration: int, model_chunks: list) -> None:
        if self.kind == "slow_steps":
            time.sleep(self.at)
        if iteration == self.at and self.kind == "nan_at_step":
            with torch.no_grad():
                next(model_chunks[0].parameters()).fill_(float("nan"))
