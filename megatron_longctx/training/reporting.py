"""What the loop reports: the per-step metrics record (loss, LR, throughput, MFU from the perf
model with the document-masked attention term, memory) and the stage-end evaluation.

Stage-end evaluation runs outside every collective on GPU clusters: rank 0 exporting and evaluating
an 8B model takes far longer than an NCCL timeout, and the other ranks would wait in a collective
until the watchdog kills the job. So with NCCL and more than one rank the trainer does not evaluate;
it logs the command, and the launcher's evaluation job (``LONGCTX_EVAL_JOB=1``,
launch/eval_longctx.sh, a dependent job on its own GPU) evaluates the final checkpoint. In-process
evaluation (rank 0 exports + evaluates, the others wait at a barrier) is kept for gloo/CPU and
one-process runs, where nothing can time out behind it."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_longctx.config.loading import expand_env
from megatron_longctx.training.callbacks import MetricsLogger, memory_gib


def log0(msg: str) -> None:
    """Prints on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def evaluate_in_trainer() -> bool:
    """True when the stage-end evaluation may run inside the trainer (see module docstring)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    return dist.get_backend() != "nccl"


def maybe_evaluate_stage(
    cfg, stage, ckpt_dir: Path, metrics: MetricsLogger, iteration: int
) -> bool:
    """Evaluates in the trainer when ``evaluate_in_trainer()``, else logs the evaluation job's
    command. Returns whether it evaluated."""
    if evaluate_in_trainer():
        evaluate_stage(cfg, stage, ckpt_dir, metrics, iteration)
        return True
    log0(
        f"[{stage.name}] stage-end evaluation is not run inside a multi-GPU NCCL job (rank 0 "
        "would hold every other rank in a collective past the timeout); it runs as its own job: "
        f"LONGCTX_EVAL_JOB=1 in launch/, or LONGCTX_EVAL_CHECKPOINT={ckpt_dir} sbatch "
        "launch/eval_longctx.sh"
    )
    return False


def evaluate_stage(cfg, stage, ckpt_dir: Path, metrics: MetricsLogger, iteration: int) -> None:
    """Rank 0 exports the stage's final checkpoint to HF and evaluates it; others wait."""
    if dist.get_rank() == 0:
        from megatron_longctx.eval import EvalSettings, evaluate_checkpoint

        settings = EvalSettings.from_dict(expand_env(dict(stage.eval_settings or {})))
        out = Path(expand_env(cfg.logging.run_dir)) / "eval" / stage.name
        results = evaluate_checkpoint(
            str(ckpt_dir),
            str(out),
            settings,
            tokenizer_type=expand_env(cfg.data.tokenizer_type or "") or None,
            tokenizer_model=expand_env(cfg.data.tokenizer_model or "") or None,
        )
        summary = {f"eval/{k}": v for k, v in _flat_scores(results).items()}
        log0(
            f"[{stage.name}] evaluation -> {out}: "
            + ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in summary.items())
        )
        if metrics.wandb is not None:
            metrics.wandb.log(summary, step=iteration)
    dist.barrier()


def _flat_scores(results: dict) -> dict[str, float]:
    """Headline accuracies of an evaluation result (for logs and wandb)."""
    scores = {}
    if (results.get("needle") or {}).get("accuracy") is not None:
        scores["needle"] = results["needle"]["accuracy"]
    for task, res in (results.get("ruler") or {}).items():
        if res.get("accuracy") is not None:
            scores[task] = res["accuracy"]
    return scores


def step_record(
    stage,
    stage_step,
    total,
    iteration,
    result,
    optimizer,
    grad_norm,
    skipped,
    micro,
    model_cfg,
    peak,
    world,
    metrics,
) -> dict:
    import time

    from megatron_longctx.perf.flops import flops_per_token, mfu

    elapsed = max(time.perf_counter() - metrics._t, 1e-9)
    tokens = stage.samples_per_step * stage.seq_length
    docs = micro[0]["doc_lengths"].tolist()
    fpt = flops_per_token(model_cfg, int(sum(docs)), docs)
    return {
        "stage": stage.name,
        "stage_step": stage_step,
        "stage_steps": total,
        "iteration": iteration,
        "loss": result.loss,
        "loss_tokens": result.num_tokens,
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm),
        "tokens_per_s": tokens / elapsed,
        "mfu": mfu(tokens / elapsed, fpt, peak * world),
        "memory_gib": memory_gib(),
        "skipped": skipped,
    }
