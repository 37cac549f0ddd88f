"""Run a function on N gloo processes with a hard timeout and tracebacks on hang.

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
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path


class DistributedTestError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        from megatron_longctx.runtime.distributed import DistEnv, init_process_group

        init_process_group(
            DistEnv(rank, world_size, rank, "127.0.0.1", port), device="cpu", timeout_s=timeout
        )
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
    ctx = mp.get_context("spawn")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="longctx-dist-")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LONGCTX_DEVICE")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LONGCTX_DEVICE="cpu")
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker, args=(rank, world_size, port, fn, args, workdir, timeout)
            )
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
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
