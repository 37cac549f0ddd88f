"""The stage-end evaluation as a training callback, registered by the entry point
(``megatron_longctx/train.py``), so training/ never imports eval/ (eval/ uses training's
Callback interface).

At the last step of a stage with ``eval: true`` (after its final checkpoint is saved):

1. **in-process, every backend (NCCL included)**: every rank runs the teacher-forced evaluation
   (``eval/in_process.py``) on the trainer's own model chunks with the stage's TP / PP / CP
   layout at the stage's sequence length, in the recipe's precision; settings from
   ``stages.N.eval_settings.in_process`` (``eval.teacher_forced.TeacherForcedSettings``). It
   states its cost first (forward tokens, time estimated from this stage's measured tok/s) and
   the stage's bound may refuse it. Results: ``{run_dir}/eval/{stage}/in_process/``
   (``eval_results.json``, ``report.md``, plots), one line per evaluation in
   ``{run_dir}/eval_metrics.jsonl`` (metrics.jsonl holds one record per training step, which
   its readers rely on), and wandb (``eval_tf/...``).
2. **the HF route** (generation-scored tasks, exported model): rank 0 exports the checkpoint to
   HF and evaluates it; the other ranks wait at a barrier. Only where nothing can time out.

The HF route runs outside every collective on GPU clusters: rank 0 exporting and evaluating an 8B
model takes far longer than an NCCL timeout, and the other ranks would wait in a collective until
the watchdog kills the job. So with NCCL and more than one rank the trainer does not run the HF
route; it logs the command, and the launcher's evaluation job (``LONGCTX_EVAL_JOB=1``,
launch/eval_longctx.sh, a dependent job on its own GPU) evaluates the final checkpoint. The HF
route in the trainer is kept for gloo/CPU and one-process runs, where nothing can time out behind
it.
"""

from __future__ import annotations

import json
import time
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
    """Evaluates each ``eval: true`` stage at its end: in-process on every rank, then the HF
    route where it may run (``stages.N.eval_settings`` override megatron_longctx.eval's
    EvalSettings; its ``in_process`` block the in-process TeacherForcedSettings)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self.tokens_per_s: float | None = None

    def stage_start(self, run) -> None:
        self._t0, self.tokens_per_s = None, None

    def before_step(self, run) -> None:
        self._t0 = time.perf_counter()

    def after_step(self, run, result) -> None:
        # this stage's measured training throughput (the cost guard's); the last step's time holds
        # the stage's final checkpoint save (callbacks before this one), so it is not used
        if self._t0 is not None and (run.step != run.total or self.tokens_per_s is None):
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            self.tokens_per_s = run.stage.samples_per_step * run.stage.seq_length / elapsed
        if run.step != run.total or not run.stage.eval:
            return
        evaluate_stage_in_process(run, self.tokens_per_s)
        ckpt = iteration_dir(run.cfg.checkpoint.save_dir, run.iteration)
        if evaluate_in_trainer():
            evaluate_stage(run, ckpt)
            return
        log0(
            f"[{run.stage.name}] the HF-route evaluation (generation-scored tasks) is not run "
            "inside a multi-GPU NCCL job (rank 0 would hold every other rank in a collective "
            "past the timeout); it runs as its own job: LONGCTX_EVAL_JOB=1 in launch/, or "
            f"LONGCTX_EVAL_CHECKPOINT={ckpt} sbatch launch/eval_longctx.sh"
        )


def split_settings(raw: dict | None) -> tuple[dict, dict]:
    """A stage's ``eval_settings`` -> (HF-route settings, in-process settings)."""
    raw = dict(raw or {})
    return raw, dict(raw.pop("in_process", None) or {})


def evaluate_stage_in_process(run, tokens_per_s: float | None = None) -> dict | None:
    """Collective: the teacher-forced evaluation of the stage's live model on every rank."""
    from megatron_longctx.data.preprocess.tokenizer import load_tokenizer
    from megatron_longctx.eval.in_process import evaluate_in_process
    from megatron_longctx.eval.megatron_model import MegatronScorer
    from megatron_longctx.eval.teacher_forced import TeacherForcedSettings, flat_tf_scores

    cfg, stage = run.cfg, run.stage
    _, raw = split_settings(stage.eval_settings)
    if not (cfg.data.tokenizer_type and cfg.data.tokenizer_model):
        log0(
            f"[{stage.name}] in-process evaluation skipped: it needs the tokenizer "
            "(set data.tokenizer_type and data.tokenizer_model)"
        )
        return None
    scorer = MegatronScorer(run.chunks, run.shard, run.model_cfg.vocab_size, stage.seq_length)
    out = Path(cfg.logging.run_dir) / "eval" / stage.name / "in_process"
    layout = f"{stage.parallel.describe()}, S={stage.seq_length}"
    try:  # bad settings or inputs fail the same way on every rank, before any collective
        settings = TeacherForcedSettings.from_dict(raw)
        tokenizer = load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        results = evaluate_in_process(
            scorer, tokenizer, settings, str(out), train_tokens_per_s=tokens_per_s,
            layout=layout, title=stage.name,
        )
    except (ValueError, FileNotFoundError) as err:
        log0(f"[{stage.name}] in-process evaluation not run: {err}")
        return None
    summary = {f"eval_tf/{k}": v for k, v in flat_tf_scores(results).items()}
    log0(
        f"[{stage.name}] in-process evaluation ({layout}; {results['cost']['forward_tokens']} "
        f"forward tokens, {results['seconds']} s) -> {out}: "
        + (results.get("refused") or ", ".join(f"{k[8:]} {v:.3f}" for k, v in summary.items()))
    )
    if dist.get_rank() == 0:
        record = {"stage": stage.name, "iteration": run.iteration, **summary}
        with open(Path(cfg.logging.run_dir) / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if run.metrics is not None:
            run.metrics.log_summary(summary, run.iteration)
    return results


def evaluate_stage(run, ckpt_dir: Path) -> None:
    """Rank 0 exports the stage's final checkpoint to HF and evaluates it; others wait."""
    if dist.get_rank() == 0:
        from megatron_longctx.eval import EvalSettings, evaluate_checkpoint

        cfg, stage = run.cfg, run.stage
        settings = EvalSettings.from_dict(split_settings(stage.eval_settings)[0])
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
