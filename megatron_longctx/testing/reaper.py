"""Find and kill every process a test session started, wherever it ended up.

Tests kill ranks on purpose (SIGKILL fault injection). A killed torchrun rank leaves its helpers
behind (megatron's checkpoint writer starts a multiprocessing manager), and those run in the rank's
own session (torchrun starts every rank with ``start_new_session``), reparented to init: neither
the session id nor the parent links lead back to the test. The environment does. ``mark_session()``
puts ``LONGCTX_TEST_SESSION=<id>`` into the test process's environment before any test starts a
process; every process started after that inherits it (torchrun, its ranks, their helpers, wandb's
service), and ``/proc/<pid>/environ`` keeps the environment a process started with, whatever
became of its parent. ``reap(id)`` kills every process carrying the id, plus (``descendants=True``)
the living descendants of this process (a child forked without exec shows the environment its
parent started with, which predates the mark). This process, its ancestors and its own
multiprocessing resource tracker are never touched, nor are other sessions' processes: ids are
unique, so concurrent test runs on one machine are safe.

A nested session appends its id (``outer:inner``), so the outer session reaps the inner one's
leftovers too. A daemon that is meant to outlive the session (the SLURM test cluster's
slurmctld) is started with ``unmarked_env()``.
"""

from __future__ import annotations

import os
import time
import uuid

import psutil

ENV = "LONGCTX_TEST_SESSION"


def mark_session() -> str:
    """Marks this process (and everything it starts from now on); returns the session id."""
    session = uuid.uuid4().hex[:16]
    inherited = os.environ.get(ENV)
    os.environ[ENV] = f"{inherited}:{session}" if inherited else session
    return session


def unmarked_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) without the mark, for a process that must outlive it."""
    out = dict(os.environ if env is None else env)
    out.pop(ENV, None)
    return out


def session_processes(session: str, descendants: bool = False) -> list[psutil.Process]:
    """The processes marked with ``session`` (and this process's descendants if asked), except
    this process and its ancestors."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents()), _own_resource_tracker()}
    found = {p.pid: p for p in me.children(recursive=True)} if descendants else {}
    for proc in psutil.process_iter():
        if proc.pid in spared or proc.pid in found:
            continue
        try:
            marks = proc.environ().get(ENV, "")
        except psutil.Error:  # gone, a zombie, or another user's
            continue
        if session in marks.split(":"):
            found[proc.pid] = proc
    return [p for pid, p in sorted(found.items()) if pid not in spared]


def _own_resource_tracker() -> int | None:
    """This process's multiprocessing resource tracker (started with the first spawned child):
    it is no leftover, it exits when this process does."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _running(proc: psutil.Process) -> bool:
    try:
        os.waitpid(proc.pid, os.WNOHANG)  # our own child: collect it
    except ChildProcessError:
        pass
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(session: str, descendants: bool = False, timeout: float = 10.0) -> dict[int, str]:
    """SIGKILLs ``session_processes(session, descendants)`` and waits (up to ``timeout``) until
    they are gone. Returns ``{pid: command line}`` of what it killed."""
    procs = session_processes(session, descendants)
    killed = {}
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:  # dead already; collected below if ours
                continue
            cmd = " ".join(proc.cmdline())[:120]
            proc.kill()
        except psutil.Error:  # gone meanwhile
            continue
        killed[proc.pid] = cmd
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        if alive:
            time.sleep(0.05)
    return killed
