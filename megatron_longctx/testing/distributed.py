"""Run a function on N gloo processes with a hard timeout and tracebacks on hang.

    from megatron_longctx.testing.distributed import run_distributed

    results = run_distributed(fn, world_size=2, args=(...,), timeout=120)

``fn(rank, world_size, *args)`` runs in each spawned process after torch.distributed is initialised
over gloo (the megatron-core CPU shim is applied first). Its return value (picklable) comes back
in a list indexed by rank. A rank that raises fails the test with that rank's traceback; a hang past
``timeout`` kills every rank and reports the faulthandler dump of each (the stacks where they hung).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path

from megatron_longctx.runtime.spawn import init_local_rank, join_ranks, spawn_ranks


class DistributedTestError(AssertionError):
    pass


class FakeGroup:
    """A stand-in process group for code that only asks its place in it (``size()``,
    ``rank()``), e.g. THD RoPE's CP slicing, run in one process."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _worker(rank, world_size, port, fn, args, workdir, timeout):
    log = open(Path(workdir) / f"rank{rank}.log", "w", buffering=1)
    # stdout too: children this rank starts (megatron's checkpoint writers, a multiprocessing
    # manager) must not inherit pytest's pipe, or a leftover child keeps a reader waiting for EOF.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.enable(file=log)
    faulthandler.dump_traceback_later(max(timeout - 3, 1), exit=True, file=log)
    result_path = Path(workdir) / f"rank{rank}.result"
    try:
        import torch

        torch.set_num_threads(1)
        init_local_rank(rank, world_size, port, timeout_s=timeout)
        out = fn(rank, world_size, *args)
        payload = ("ok", out)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        payload = ("error", traceback.format_exc())
    try:
        result_path.write_bytes(pickle.dumps(payload))
    except Exception:  # unpicklable result
        result_path.write_bytes(pickle.dumps(("error", traceback.format_exc())))
    log.flush()
    for child in mp.active_children():  # e.g. dist_checkpointing's results-queue manager
        child.kill()
    os._exit(0)  # skip atexit/gloo teardown, which can hang when a peer is gone


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 180) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` processes; per-rank results."""
    workdir = tempfile.mkdtemp(prefix="longctx-dist-")
    env = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LONGCTX_DEVICE="cpu")
    procs, _ = spawn_ranks(_worker, world_size, fn, args, workdir, timeout, env=env)
    hung = join_ranks(procs, timeout)
    results, errors = [], []
    for rank in range(world_size):
        path = Path(workdir) / f"rank{rank}.result"
        log_path = Path(workdir) / f"rank{rank}.log"
        log = log_path.read_text(errors="replace")[-6000:] if log_path.exists() else "(no log)"
        if not path.exists():
            errors.append(
                f"--- rank {rank}: no result (hung={rank in hung}, "
                f"exitcode={procs[rank].exitcode}); log tail:\n{log}"
            )
            results.append(None)
            continue
        status, value = pickle.loads(path.read_bytes())
        if status == "error":
            errors.append(f"--- rank {rank} raised:\n{value}")
        results.append(value)
    if errors:
        head = f"distributed test failed ({f'timeout after {timeout}s' if hung else 'error'})"
        raise DistributedTestError(head + "\n" + "\n".join(errors))
    return results
