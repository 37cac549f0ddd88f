"""The input pipeline ahead of the device: the next step's micro-batches prepared in a thread.

Per step the loader packs samples, deals them to DP ranks / micro-batches by work and the batch
path lays them out for CP (``BatchSharding.host``): 0.1-0.5 s per step measured on CPU, which
the device would otherwise wait for between steps. ``StepPrefetcher`` runs that host work in a
background thread, one step ahead (as Megatron-LM's data loader workers and torchtitan's
dataloader prefetch do), into pinned host buffers; the training thread only starts the
non-blocking copies (``BatchSharding.to_device``). A thread, not a process: the loader's state
(consumed samples, the step's assignment) stays in this process, and the host work is numpy
that overlaps a device step (whose Python thread waits on the GPU, or on torch ops that release
the GIL).

Batches are the loader's, in its order: identical to building them in the training thread. The
loader runs ahead, so what callbacks and checkpoints read from ``run.loader`` (its state to
resume from, ``consumed_samples``, ``step_balance``) is this object's snapshot of the step last
handed out: resume is unchanged. It produces exactly the stage's remaining steps (the index has
no samples past them).

Accounting (``wait_s`` / ``host_s`` per step): how long the training thread waited for a step's
inputs and how long the thread spent preparing them; benchmarks/README shows both.
"""

from __future__ import annotations

import queue
import threading
import time

_DONE = object()


class StepPrefetcher:
    """This rank's micro-batches, one step ahead (see the module docstring).

    Args:
        loader: the stage's loader (``MixtureLoader``), already restored to its position.
        shard: the stage's ``BatchSharding`` (host half in the thread, device half on ``next``).
        num_steps: steps to produce (the stage's remaining steps).
        depth: steps prepared ahead of the one being trained.
    """

    def __init__(self, loader, shard, num_steps: int, depth: int = 1):
        self.loader, self.shard = loader, shard
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._snapshot = self._state()
        self.wait_s: list[float] = []
        self.host_s: list[float] = []
        self._thread = threading.Thread(
            target=self._produce, args=(num_steps,), name="longctx-prefetch", daemon=True
        )
        self._thread.start()

    def _state(self) -> dict:
        return {
            "state": self.loader.state_dict(),
            "consumed": self.loader.consumed_samples,
            "balance": self.loader.step_balance(),
        }

    def _produce(self, num_steps: int) -> None:
        try:
            for _ in range(num_steps):
                start = time.perf_counter()
                count = self.loader.num_micro_batches
                host = [self.shard.host(next(self.loader)) for _ in range(count)]
                item = (host, self._state(), time.perf_counter() - start)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as err:  # handed to the training thread, raised there
            self._queue.put(err)

    def next_step(self) -> list[dict]:
        """The coming step's micro-batches on the training device."""
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s.append(time.perf_counter() - start)
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise StopIteration("the stage's steps are all taken")
        host, self._snapshot, host_s = item
        self.host_s.append(host_s)
        return [self.shard.to_device(batch) for batch in host]

    def close(self) -> None:
        """Stops the thread (a stage that ends early: preemption, a halt)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)

    # what callbacks and checkpoints read from run.loader: the step last handed out
    @property
    def consumed_samples(self) -> int:
        return self._snapshot["consumed"]

    def state_dict(self) -> dict:
        return dict(self._snapshot["state"])

    def step_balance(self) -> dict[str, float]:
        return dict(self._snapshot["balance"])

    def load_state_dict(self, state: dict) -> None:
        raise RuntimeError("restore the loader before the prefetcher starts (checkpoint/start.py)")

    def __getattr__(self, name: str):  # the loader's static settings (batch sizes, index)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.loader, name)
