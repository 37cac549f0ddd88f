"""The session reaper (megatron_longctx/testing/reaper.py) kills what a SIGKILLed torchrun rank
leaves behind: its multiprocessing helper, which runs in the rank's own session (torchrun starts
ranks with ``start_new_session``) and is reparented away from the rank, so neither the old
session-id filter nor the parent links find it. Other sessions' processes are left alone."""

import os
import signal
import subprocess
import sys
import uuid

import psutil
import pytest

from megatron_longctx.testing.reaper import ENV, reap, session_processes, unmarked_env

# A rank as the SIGKILL fault tests run it: it starts a multiprocessing manager (what megatron's
# checkpoint writer starts), reports the manager's pid, then kills itself (kill_after_step).
RANK = """
import multiprocessing as mp, os, signal, sys
if __name__ == "__main__":
    manager = mp.get_context(sys.argv[1]).Manager()
    print(manager._process.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reaper_kills_the_orphaned_helper_of_a_killed_rank(method):
    session = uuid.uuid4().hex[:16]  # a sub-session: only this test's processes carry it
    marks = ":".join(x for x in (os.environ.get(ENV), session) if x)
    env = dict(os.environ, **{ENV: marks})
    rank = subprocess.Popen(
        [sys.executable, "-c", RANK, method],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as torchrun starts its ranks
    )
    helper = int(rank.stdout.readline())
    assert rank.wait(timeout=60) == -signal.SIGKILL
    rank.stdout.close()
    bystander = subprocess.Popen(  # another session's process (a concurrent test run)
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env=dict(unmarked_env(), **{ENV: uuid.uuid4().hex[:16]}),
    )
    try:
        assert _alive(helper), "the helper should outlive its killed rank"
        orphan = psutil.Process(helper)
        assert orphan.ppid() != rank.pid and orphan.ppid() != os.getpid()
        assert os.getsid(helper) != os.getsid(0)  # why the old session-id filter missed it
        assert helper in [p.pid for p in session_processes(session)]

        killed = reap(session)

        assert helper in killed and bystander.pid not in killed
        assert not _alive(helper)
        assert session_processes(session) == []  # a spawn helper's resource tracker too
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        reap(session)
