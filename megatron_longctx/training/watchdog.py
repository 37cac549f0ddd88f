"""Hang detection and straggler figures, both from the step-end collective.

A rank that stops making progress (a stuck collective, a frozen process, a peer whose network is
gone) makes every other rank wait in a collective until the process group's timeout
(``training.dist_timeout_minutes``, 30 min by default), holding every GPU of the job. The
``HangWatchdog`` bounds that wait by the measured step time instead: a daemon thread on every rank
checks a deadline that the trainer re-arms at each phase of a step; past it, the rank writes the
Python stacks of all its threads (faulthandler) to ``<run_dir>/hang/rank<N>.txt`` (with
``.restart<R>`` before ``.txt`` in run R of a requeued SLURM job) and exits with ``EXIT_HUNG``,
which the launcher requeues like a preemption (the job resumes from the newest complete
checkpoint). The bound of a step is ``factor`` x the slowest of the last few steps (the
step-end collective's maximum over ranks), clamped to [``floor_s``, ``ceiling_s``]; phases with no
measured step behind them (a stage's first step, a checkpoint save, the work between steps) get
``ceiling_s``. Settings: ``training.hang_timeout_factor / _min_s / _max_s``.

``StepTimes`` turns the per-rank times that the same collective gathers into the straggler figures
of the metrics record (which rank arrived last at the step end and by how much, which rank used
the most CPU time in the step).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("megatron_longctx.train")

EXIT_HUNG = 76  # signals.py: "no progress / a peer is gone": requeue, resume from a checkpoint


def record_exit(code: int, reason: str, rank: int) -> None:
    """Tells the launcher why this rank ends: ``<LONGCTX_STATUS_DIR>/<host>.<rank>.exit`` (code,
    reason). srun reports the highest exit code of its tasks, which after a hang is the SIGKILL of
    the rank that hung (137), not this rank's EXIT_HUNG; launch/common.sh reads these files."""
    status_dir = os.environ.get("LONGCTX_STATUS_DIR")
    if not status_dir:
        return
    try:
        path = Path(status_dir) / f"{socket.gethostname()}.{rank}.exit"
        path.write_text(f"{code} {reason}\n")
    except OSError as err:
        logger.warning("could not record exit code %d in %s: %s", code, status_dir, err)


def exit_now(code: int) -> None:
    """Ends the process at once with ``code``, after SIGKILLing its own child processes
    (megatron's checkpoint helper runs with SIGTERM ignored and holds the task's stdout: SLURM
    would wait for it, 60 s, before the step ends). No Python shutdown: it would wait for the
    stuck collective."""
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception as err:  # noqa: BLE001 (exiting regardless)
        logger.warning("could not kill child processes: %s", err)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class HangBounds:
    """factor: the bound is ``factor`` x the slowest recent step; 0 turns the watchdog off.
    floor_s / ceiling_s: the bound's clamp; ``ceiling_s`` also bounds phases with no measured step
    (a stage's first step, saves, the time between steps). window: how many recent steps the
    slowest is taken from."""

    factor: float = 5.0
    floor_s: float = 120.0
    ceiling_s: float = 900.0
    window: int = 8


class HangWatchdog:
    """A deadline per phase of the step, checked by a daemon thread.

    Args:
        run_dir: where ``hang/rank<N>.txt`` (the stacks) goes.
        rank: this process's global rank.
        bounds: factor, floor, ceiling and window (HangBounds).
        clock: time source (tests). exit_fn: called with EXIT_HUNG after the stacks are written
            (tests; the default ends the process at once, without Python's shutdown, which would
            wait for the stuck collective).
        poll_s: how often the thread looks (default: a twentieth of the floor, 0.05-5 s).
    """

    def __init__(
        self,
        run_dir: str | Path,
        rank: int = 0,
        bounds: HangBounds | None = None,
        clock=time.monotonic,
        exit_fn=exit_now,
        poll_s: float | None = None,
    ):
        b = bounds or HangBounds()
        self.run_dir, self.rank = Path(run_dir), rank
        self.factor, self.floor_s = float(b.factor), float(b.floor_s)
        self.ceiling_s = float(b.ceiling_s)
        self.clock, self.exit_fn = clock, exit_fn
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, self.floor_s / 20))
        self._steps: deque[float] = deque(maxlen=b.window)
        self._deadline: float | None = None
        self._phase, self._bound = "start", 0.0
        self._armed_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    @classmethod
    def from_config(cls, training, run_dir: str | Path, rank: int = 0) -> HangWatchdog:
        """From the recipe's ``training:`` section (config/schema.py TrainingSection)."""
        bounds = HangBounds(
            training.hang_timeout_factor, training.hang_timeout_min_s, training.hang_timeout_max_s
        )
        return cls(run_dir, rank, bounds)

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def bound_s(self) -> float:
        """The time a step may take: factor x the slowest recent step, clamped; the ceiling
        while no step has been measured."""
        if not self._steps:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.factor * max(self._steps)))

    def record_step(self, seconds: float) -> None:
        """A measured step time (the slowest rank's, from the step-end collective)."""
        self._steps.append(float(seconds))

    def reset_steps(self) -> None:
        """A new stage: other sequence length, other step time; measure again."""
        self._steps.clear()

    def arm(self, phase: str, bound_s: float | None = None) -> None:
        """From now on, ``phase`` must end within ``bound_s`` (default ``bound_s()``)."""
        if not self.enabled:
            return
        bound = self.bound_s() if bound_s is None else bound_s
        with self._lock:
            self._armed_at = self.clock()
            self._deadline = self._armed_at + bound
            self._phase, self._bound = phase, bound
        self.start()

    def arm_long(self, phase: str) -> None:
        """A phase without a measured step behind it: the ceiling."""
        self.arm(phase, self.ceiling_s)

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def overdue(self) -> bool:
        """True once the armed phase has passed its deadline."""
        with self._lock:
            return self._deadline is not None and self.clock() > self._deadline

    def start(self) -> None:
        if self._thread is None and self.enabled:
            _RUNNING.append(self)
            self._thread = threading.Thread(target=self._watch, name="longctx-hang-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self.disarm()
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.overdue():
                self.fire()
                return

    def fire(self) -> None:
        """Writes every thread's stack to ``hang/rank<N>.txt``, logs, and exits EXIT_HUNG."""
        self.fired = True
        with self._lock:
            waited, phase, bound = self.clock() - self._armed_at, self._phase, self._bound
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # one file per run of a job
        suffix = f".restart{restart}" if restart else ""
        path = self.run_dir / "hang" / f"rank{self.rank:05d}{suffix}.txt"
        msg = (
            f"hang watchdog (rank {self.rank}): no progress in '{phase}' for {waited:.1f} s "
            f"(bound {bound:.1f} s; a step's: {self.factor:g} x slowest recent step "
            f"{max(self._steps, default=0.0):.2f} s, clamped to [{self.floor_s:g}, "
            f"{self.ceiling_s:g}] s; first steps and saves: {self.ceiling_s:g} s)"
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(msg + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            msg += f"; stacks of all threads in {path}"
        except OSError as err:
            msg += f"; could not write stacks to {path} ({err}), dumping to stderr"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"{msg}; exiting {EXIT_HUNG} so the launcher requeues the job", file=sys.stderr,
              flush=True)
        record_exit(EXIT_HUNG, f"no progress in '{phase}' for {waited:.1f} s", self.rank)
        sys.stdout.flush()
        self.exit_fn(EXIT_HUNG)


_RUNNING: list[HangWatchdog] = []


def stop_all() -> None:
    """Stops every watchdog of this process (a run ending with an error that is not a hang: its
    shutdown must not be taken for one and requeued)."""
    for wd in _RUNNING:
        wd.stop()


class StepTimes:
    """Per-rank step timings for the step-end collective, and the straggler figures from them.

    ``local()`` gives this rank's two figures since the previous step end: ``arrival`` (wall
    time from the previous step-end collective's return to reaching this one: the collective
    returns on all ranks at about the same moment, so these are comparable across hosts without
    synchronized clocks) and ``cpu`` (this process's CPU time in the step; waiting in gloo / a
    paused process uses none). ``figures()`` reads the gathered [world, 2] table.
    """

    def __init__(self, clock=time.monotonic, cpu_clock=time.process_time):
        self.clock, self.cpu_clock = clock, cpu_clock
        self.mark()

    def mark(self) -> None:
        """The step-end collective returned: the next step starts now."""
        self._t, self._cpu = self.clock(), self.cpu_clock()

    def local(self) -> tuple[float, float]:
        return self.clock() - self._t, self.cpu_clock() - self._cpu

    @staticmethod
    def figures(arrival: list[float], cpu: list[float]) -> dict:
        """The metrics record's straggler fields from every rank's ``arrival`` and ``cpu``:
        ``step_time_max_s`` (the slowest rank's arrival: the step's length),
        ``straggler_rank`` / ``straggler_lag_s`` (the last rank at the step end, and how long
        after the median rank it arrived), ``cpu_straggler_rank`` / ``cpu_lag_s`` (the rank that
        computed longest, and by how much more than the median rank)."""
        slow = max(range(len(arrival)), key=arrival.__getitem__)
        busy = max(range(len(cpu)), key=cpu.__getitem__)
        return {
            "step_time_max_s": arrival[slow],
            "straggler_rank": slow,
            "straggler_lag_s": arrival[slow] - statistics.median(arrival),
            "cpu_straggler_rank": busy,
            "cpu_lag_s": cpu[busy] - statistics.median(cpu),
        }
