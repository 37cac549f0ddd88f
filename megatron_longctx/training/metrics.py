"""What the loop reports: the per-step metrics record (loss, LR, throughput, MFU from the perf
model with the document-masked attention term, memory, CP / DP balance) to stdout (rank 0, every
``logging.interval`` steps), metrics.jsonl, wandb (offline unless configured) and a loss-curve PNG.
The step end (training/callbacks.py Preemption) adds the straggler figures of its collective:
``step_time_max_s``, ``straggler_rank`` / ``straggler_lag_s`` (last rank at the step end, seconds
after the median rank), ``cpu_straggler_rank`` / ``cpu_lag_s`` (training/watchdog.py StepTimes).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_longctx.train")

CPU_NOMINAL_PEAK_FLOPS = 1e11  # MFU on CPU is indicative only
GPU_PEAK_FLOPS = 989e12  # H100 bf16 dense


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    """Rank-0 log line per interval, metrics.jsonl per step, wandb (offline unless configured)."""

    def __init__(self, section, config: dict, resume_iteration: int = 0):
        """Args:
        section: the recipe's ``logging:`` (config.schema.LoggingSection).
        config: the resolved experiment config (wandb's run config).
        resume_iteration: records past it are dropped (the resumed run recomputes them).
        """
        self.rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
        self.run_dir = Path(section.run_dir)
        self.interval = max(1, section.interval)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self._t = time.perf_counter()
        if not self.rank0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_iteration)
        self.wandb = self._init_wandb(config, section.wandb_project, section.wandb_mode)

    @property
    def seconds_since_last(self) -> float:
        return max(time.perf_counter() - self._t, 1e-9)

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

    def stamp(self, record: dict) -> None:
        """Sets the record's ``step_time_s`` (this rank, since the previous record) now; ``log``
        does it for a record not stamped before."""
        now = time.perf_counter()
        record["step_time_s"] = now - self._t
        self._t = now

    def log(self, record: dict) -> None:
        if "step_time_s" not in record:
            self.stamp(record)
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
                + (
                    f" | slowest rank {record['straggler_rank']} "
                    f"+{record['straggler_lag_s']:.2f} s"
                    if "straggler_rank" in record
                    else ""
                )
                + (" | SKIPPED" if record.get("skipped") else ""),
                flush=True,
            )

    def log_summary(self, summary: dict[str, float], iteration: int) -> None:
        """Extra figures for wandb at ``iteration`` (e.g. a stage-end evaluation's scores)."""
        if self.wandb is not None:
            self.wandb.log(summary, step=iteration)

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


def step_record(run, result, elapsed: float) -> dict:
    """The metrics record of the step ``run`` (training/state.py's StageRun) just finished in
    ``elapsed`` seconds."""
    from megatron_longctx.perf.flops import flops_per_token, mfu

    stage = run.stage
    peak = run.cfg.training.peak_flops_per_device or (
        GPU_PEAK_FLOPS if torch.cuda.is_available() else CPU_NOMINAL_PEAK_FLOPS
    )
    tokens = stage.samples_per_step * stage.seq_length
    docs = list(result.doc_lengths)
    fpt = flops_per_token(run.model_cfg, int(sum(docs)), docs)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "stage": stage.name,
        "stage_step": run.step,
        "stage_steps": run.total,
        "iteration": run.iteration,
        "loss": result.loss,
        "loss_tokens": result.num_tokens,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": float(result.grad_norm),
        "tokens_per_s": tokens / elapsed,
        "mfu": mfu(tokens / elapsed, fpt, peak * world),
        "memory_gib": memory_gib(),
        "skipped": result.skipped,
    }
