"""Run the teacher-forced evaluation on a live megatron model: cost guard, score, write results.

``evaluate_in_process`` is collective (every rank calls it with the same settings); it states the
cost first (forward tokens, packed sequences, and an estimated time from the trainer's measured
throughput), refuses an evaluation above the stage's bound (``max_forward_tokens`` /
``max_seconds``: logged and recorded, never a crash), then scores and, on rank 0 only, writes
``eval_results.json``, ``report.md`` and the plots. Writing is the only rank-0 work and nothing
waits for it.

Estimated time: a forward pass costs about a third of a training step's forward + backward
(the backward does twice the forward's matmuls), so ``forward_tokens / (3 x train tok/s)``;
short prompts packed together are cheaper than that (less attention), so it is an upper bound
on attention-heavy stages.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from megatron_longctx.eval.megatron_model import MegatronScorer
from megatron_longctx.eval.packing import plan_packs
from megatron_longctx.eval.teacher_forced import (
    TeacherForcedSettings,
    format_tf_report,
    plan,
    results_of,
)
from megatron_longctx.runtime.distributed import log0

logger = logging.getLogger(__name__)

#: a forward pass is about this many times faster than a training step's forward + backward
FORWARD_SPEEDUP = 3.0


@dataclass
class EvalCost:
    """What an evaluation will cost.

    Attributes:
        forward_tokens: tokens run through the model (all packs, all DP replicas).
        num_packs: packed sequences.
        estimated_seconds: from ``train_tokens_per_s`` (None when unknown).
    """

    forward_tokens: int
    num_packs: int
    estimated_seconds: float | None

    def describe(self) -> str:
        est = "unknown" if self.estimated_seconds is None else f"~{self.estimated_seconds:.0f} s"
        return (
            f"{self.forward_tokens} forward tokens in {self.num_packs} packed sequences, "
            f"estimated {est}"
        )


def estimate_cost(requests, seq_length: int, train_tokens_per_s: float | None) -> EvalCost:
    """The cost of scoring ``requests`` at ``seq_length`` (pure)."""
    lengths = [len(r.tokens) for r in requests]
    packs = plan_packs(lengths, seq_length)
    tokens = int(sum(lengths))
    est = None
    if train_tokens_per_s:
        est = tokens / (FORWARD_SPEEDUP * float(train_tokens_per_s))
    return EvalCost(tokens, len(packs), est)


def refusal(cost: EvalCost, settings: TeacherForcedSettings) -> str | None:
    """Why the stage's bound refuses ``cost`` (None: it may run)."""
    bound = settings.max_forward_tokens
    if bound is not None and cost.forward_tokens > bound:
        return (
            f"{cost.forward_tokens} forward tokens exceed max_forward_tokens "
            f"{settings.max_forward_tokens}: lower num_samples / context_lengths / "
            "loss_num_documents, or raise the bound"
        )
    if (
        settings.max_seconds is not None
        and cost.estimated_seconds is not None
        and cost.estimated_seconds > settings.max_seconds
    ):
        return (
            f"estimated {cost.estimated_seconds:.0f} s exceeds max_seconds {settings.max_seconds:g}"
            ": lower num_samples / context_lengths / loss_num_documents, or raise the bound"
        )
    return None


def evaluate_in_process(
    scorer: MegatronScorer,
    tokenizer,
    settings: TeacherForcedSettings | dict | None,
    out_dir: str | None,
    *,
    train_tokens_per_s: float | None = None,
    layout: str = "",
    title: str = "",
) -> dict:
    """Collective: the teacher-forced evaluation of ``scorer``'s model (see module docstring).

    Returns:
        The results dict (the same on every rank); written under ``out_dir`` by rank 0.
    """
    import torch.distributed as dist

    if not isinstance(settings, TeacherForcedSettings):
        settings = TeacherForcedSettings.from_dict(settings)
    t0 = time.time()
    p = plan(tokenizer, settings, scorer.seq_length)
    cost = estimate_cost(p.requests, scorer.seq_length, train_tokens_per_s)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log0(f"in-process evaluation ({layout or '?'}) will cost: {cost.describe()}")
    reason = refusal(cost, settings)
    if not p.requests:  # every task too long for the sequence (the same on every rank)
        reason = "nothing to evaluate: " + (
            "; ".join(f"{s.get('task', 'length')} {s['length']}: {s['reason']}" for s in p.skipped)
            or "no tasks"
        )
    if reason is not None:
        log0(f"in-process evaluation not run: {reason}")
        results = {
            "lengths": {"evaluated": [], "skipped": p.skipped},
            "refused": reason,
        }
    else:
        results = results_of(p, scorer.score(p.requests), settings)
    results["cost"] = {
        "forward_tokens": cost.forward_tokens,
        "num_packs": cost.num_packs,
        "estimated_seconds": cost.estimated_seconds,
        "train_tokens_per_s": train_tokens_per_s,
    }
    results["layout"] = layout
    results["seconds"] = round(time.time() - t0, 2)
    if rank0 and out_dir:
        write_results(results, out_dir, settings, title)
    return results


def write_results(results: dict, out_dir: str, settings: TeacherForcedSettings, title: str) -> None:
    """``eval_results.json``, ``report.md`` and (``settings.plots``) the PNGs of eval/plots.py."""
    os.makedirs(out_dir, exist_ok=True)
    plots = {}
    needle = results.get("teacher_forced", {}).get("needle")
    if settings.plots and needle and needle["lengths"]:
        from megatron_longctx.eval.plots import needle_heatmap

        plots["needle_heatmap"] = os.path.join(out_dir, "needle_heatmap.png")
        needle_heatmap(needle["grid"], needle["lengths"], needle["depths"], plots["needle_heatmap"])
    if settings.plots and "loss_by_position" in results:
        from megatron_longctx.eval.plots import loss_plot

        plots["loss_by_position"] = os.path.join(out_dir, "loss_by_position.png")
        loss_plot(results["loss_by_position"], plots["loss_by_position"])
    results["plots"] = plots
    with open(os.path.join(out_dir, "eval_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(format_tf_report(results, title))
