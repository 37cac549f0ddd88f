import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_sessionfinish(session, exitstatus):
    """Reap multiprocessing helpers orphaned by ranks that tests killed on purpose (SIGKILL fault
    injection): megatron's checkpoint writer starts a multiprocessing manager that outlives a
    killed parent. Only orphans (parent 1) of this test session (same session id) are touched."""
    import signal

    import psutil

    sid = os.getsid(0)
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if (
                proc.info["ppid"] == 1
                and "multiprocessing" in cmd
                and os.getsid(proc.info["pid"]) == sid
            ):
                os.kill(proc.info["pid"], signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
