"""The stage-end evaluation as a training callback, registered by the entry point
(``megatron_longctx/train.py``), so training/ never imports eval/ (eval/ uses training's
Callback interface).

At the last step of a stage with ``eval: true`` (after its final checkpoint is saved) rank 0
exports that checkpoint to HF and evaluates it; the other ranks wait at a barrier.

That runs outside every collective on GPU clusters: rank 0 exporting and evaluating an 8B model
takes far longer than an NCCL timeout, and the other ranks would wait in a collective until the
watchdog kills the job. So with NCCL and more than one rank the trainer does not evaluate; it logs
the command, and the launcher's evaluation job (``LONGCTX_EVAL_JOB=1``, launch/eval_longctx.sh, a
dependent job on its own GPU) evaluates the final checkpoint. In-process evaluation is kept for
gloo/CPU and one-process runs, where nothing can time out behind it.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_longctx.checkpoint.dist import iteration_dir
from megatron_longctx.runtime.distributed import log0
from megatron_longctx.training.callbacks import Callback


def evaluate_in_trainer() -> bool:
    """True when the stage-end evaluation may run inside the trainer (see module docstring)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    return dist.get_backend() != "nccl"


class StageEndEvaluation(Callback):
    """Evaluates each ``eval: true`` stage's final checkpoint (``stages.N.eval_settings``
    override megatron_longctx.eval.EvalSettings)."""

    def after_step(self, run, result) -> None:
        if run.step != run.total or not run.stage.eval:
            return
        ckpt = iteration_dir(run.cfg.checkpoint.save_dir, run.iteration)
        if evaluate_in_trainer():
            evaluate_stage(run, ckpt)
            return
        log0(
            f"[{run.stage.name}] stage-end evaluation is not run inside a multi-GPU NCCL job "
            "(rank 0 would hold every other rank in a collective past the timeout); it runs as its "
            f"own job: LONGCTX_EVAL_JOB=1 in launch/, or LONGCTX_EVAL_CHECKPOINT={ckpt} sbatch "
            "launch/eval_longctx.sh"
        )


def evaluate_stage(run, ckpt_dir: Path) -> None:
    """Rank 0 exports the stage's final checkpoint to HF and evaluates it; others wait."""
    if dist.get_rank() == 0:
        from megatron_longctx.eval import EvalSettings, evaluate_checkpoint

        cfg, stage = run.cfg, run.stage
        settings = EvalSettings.from_dict(dict(stage.eval_settings or {}))
        out = Path(cfg.logging.run_dir) / "eval" / stage.name
        results = evaluate_checkpoint(
            str(ckpt_dir),
            str(out),
            settings,
            tokenizer_type=cfg.data.tokenizer_type or None,
            tokenizer_model=cfg.data.tokenizer_model or None,
        )
        summary = {f"eval/{k}": v for k, v in flat_scores(results).items()}
        log0(
            f"[{stage.name}] evaluation -> {out}: "
            + ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in summary.items())
        )
        run.metrics.log_summary(summary, run.iteration)
    dist.barrier()


def flat_scores(results: dict) -> dict[str, float]:
    """Headline accuracies of an evaluation result (for logs and wandb)."""
    scores = {}
    if (results.get("needle") or {}).get("accuracy") is not None:
        scores["needle"] = results["needle"]["accuracy"]
    for task, res in (results.get("ruler") or {}).items():
        if res.get("accuracy") is not None:
            scores[task] = res["accuracy"]
    loss = results.get("loss_by_position") or {}
    if loss.get("mean_loss") is not None:  # held-out text loss over the evaluated window
        scores[f"loss@{loss['length']}"] = loss["mean_loss"]
    return scores
