import os

from megatron_longctx.testing.reaper import mark_session, reap

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Before any test starts a process: everything started from here on carries this session's id.
SESSION = mark_session()


def pytest_sessionfinish(session, exitstatus):
    """Kill every process this test session started that is still alive: e.g. the multiprocessing
    helpers of torchrun ranks that the SIGKILL fault tests killed on purpose (megatron's checkpoint
    writer starts a multiprocessing manager that outlives a killed parent, in the rank's own
    session). See megatron_longctx/testing/reaper.py."""
    killed = reap(SESSION, descendants=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if killed and reporter is not None:
        reporter.write_line(f"reaped {len(killed)} leftover process(es) of this session:")
        for pid, cmd in killed.items():
            reporter.write_line(f"  {pid} {cmd}")
