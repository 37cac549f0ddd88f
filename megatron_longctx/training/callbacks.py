"""Small callbacks around the loop: signals, logging (stdout, metrics.jsonl, wandb, PNG), faults.

Exit codes a launcher can act on (launch/common.sh requeues on EXIT_PREEMPTED only):
  0  finished;  EXIT_PREEMPTED (75) checkpoint saved after SIGTERM/SIGUSR1, requeue me;
  EXIT_NONFINITE (3) NaN/inf loss or grad norm, nothing checkpointed after it; 2 config error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_longctx.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_NONFINITE = 3
EXIT_CONFIG = 2


class SignalWatcher:
    """Records SIGTERM / SIGUSR1 on this rank; ``agreed()`` is a collective OR over all ranks.

    SLURM signals every process of a job on preemption, including the helper process megatron's
    checkpoint writer starts (a multiprocessing manager); killed mid-save, it breaks the save we
    are about to make. So the helper is started here, once, with those signals ignored (an
    ignored disposition survives the helper's exec), before our handlers are installed.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
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

    def agreed(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class FaultInjector:
    """Test hook: ``LONGCTX_FAULT=kill_after_step:N`` / ``kill_in_save:N`` / ``nan_at_step:N`` /
    ``term_after_step:N`` makes global rank 0 really SIGKILL / SIGTERM itself, or poisons a weight
    with NaN, at iteration N. Unset in normal runs (then every method is a no-op)."""

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
        if iteration == self.at and self.kind == "nan_at_step":
            with torch.no_grad():
                next(model_chunks[0].parameters()).fill_(float("nan"))


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    """Rank-0 log line per interval, metrics.jsonl per step, wandb (offline unless configured)."""

    def __init__(
        self,
        run_dir: str | Path,
        interval: int,
        config: dict,
        *,
        wandb_project: str,
        wandb_mode: str,
        resume_iteration: int,
    ):
        self.rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
        self.run_dir = Path(run_dir)
        self.interval = max(1, interval)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self._t = time.perf_counter()
        if not self.rank0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_iteration)
        self.wandb = self._init_wandb(config, wandb_project, wandb_mode)

    def _truncate(self, iteration: int) -> None:
        """Drops records past the resumed iteration (they will be recomputed identically)."""
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["iteration"] <= iteration
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def _init_wandb(self, config: dict, project: str, mode: str):
        if mode == "disabled":
            return None
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb
        except ImportError:
            logger.warning("wandb is not installed; logging to metrics.jsonl only")
            return None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(
            project=project,
            name=config.get("name"),
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(self.run_dir),
            config=config,
        )

    def reset_timer(self) -> None:
        self._t = time.perf_counter()

    def log(self, record: dict) -> None:
        now = time.perf_counter()
        record["step_time_s"] = now - self._t
        self._t = now
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))},
                step=record["iteration"],
            )
        if record["stage_step"] % self.interval == 0 or record.get("skipped"):
            print(
                f"[{record['stage']}] step {record['stage_step']:>4}/{record['stage_steps']} "
                f"iter {record['iteration']:>4} | loss {record['loss']:.4f} | "
                f"lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.3f} | "
                f"tok/s {record['tokens_per_s']:.0f} | MFU {100 * record['mfu']:.2f}% | "
                f"mem {record['memory_gib']:.2f} GiB"
                + (" | SKIPPED" if record.get("skipped") else ""),
                flush=True,
            )

    def plot(self) -> Path | None:
        """Writes loss_curve.png from metrics.jsonl (rank 0)."""
        if not self.rank0 or not self.path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        if not recs:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        for stage in dict.fromkeys(r["stage"] for r in recs):
            pts = [(r["iteration"], r["loss"]) for r in recs if r["stage"] == stage]
            ax.plot(*zip(*pts), label=stage)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (token-averaged)")
        ax.legend()
        ax.grid(alpha=0.3)
        out = self.run_dir / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
