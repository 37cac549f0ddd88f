"""Local process bootstrapping: a free port, N spawned gloo ranks on this machine, and their join.

The one place that starts local ranks without torchrun: the multi-process test harness
(``megatron_longctx.testing.distributed``), HF -> megatron conversion at TP x PP
(``checkpoint/hf/hf_to_mcore.py``), the export parity probe (``checkpoint/hf/verify.py``) and the
single-process evaluation (``eval/passkey.py``, world size 1).

    procs, port = spawn_ranks(target, world_size, *args)  # target(rank, world_size, port, *args)
    stopped = join_ranks(procs, timeout=600)               # ranks killed after the deadline

In a rank, ``init_local_rank(rank, world_size, port)`` sets up torch.distributed over gloo.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def spawn_ranks(target, world_size: int, *args, env: dict | None = None) -> tuple[list, int]:
    """Starts ``target(rank, world_size, port, *args)`` in ``world_size`` spawned processes.

    Args:
        target: a picklable (module-level) function.
        world_size: number of ranks.
        args: passed on after ``(rank, world_size, port)``.
        env: variables the children start with (this process's environment is restored after).

    Returns:
        ``(processes by rank, the rendezvous port)``.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=target, args=(rank, world_size, port, *args))
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return procs, port


def join_ranks(procs: list, timeout: float | None = None, fail_fast: bool = False) -> list[int]:
    """Waits for ``procs``; kills those still running past ``timeout``, or, with ``fail_fast``, as
    soon as one rank exited non-zero (the others would wait in a collective forever).

    Returns:
        The ranks that were still running and were killed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        alive = [p for p in procs if p.is_alive()]
        if not alive or (fail_fast and any(p.exitcode not in (None, 0) for p in procs)):
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        waits = [w for w in (0.2 if fail_fast else None, left) if w is not None]
        alive[0].join(min(waits) if waits else None)
    stopped = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    return stopped


def init_local_rank(rank: int, world_size: int, port: int, timeout_s: float | None = None):
    """torch.distributed over gloo for a rank that ``spawn_ranks`` started (CPU device)."""
    from megatron_longctx.runtime.distributed import DEFAULT_TIMEOUT_S, DistEnv, init_process_group

    return init_process_group(
        DistEnv(rank, world_size, rank, LOCALHOST, port),
        device="cpu",
        timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
    )
