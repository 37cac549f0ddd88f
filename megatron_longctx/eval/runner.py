"""Run the long-context evaluation and write ``eval_results.json``, ``report.md`` and plots.

``evaluate(model_dir, out_dir, settings)`` is what the curriculum calls at the end of a stage (on
rank 0, after exporting the stage's checkpoint to HF); ``evaluate_checkpoint`` does that export
itself through the library's ``checkpoint.hf.mcore_to_hf`` (what ``tools/convert_checkpoint.py
mcore-to-hf`` runs, so it works from any install, editable or not). Lengths beyond the model's
``max_position_embeddings`` are skipped and recorded with the reason, never silently clipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

from megatron_longctx.config.loading import check_keys
from megatron_longctx.eval.loss_position import loss_by_position
from megatron_longctx.eval.model import HFEvalModel, load_eval_tokenizer
from megatron_longctx.eval.tasks import RULER_TASKS, Sample, TaskBuilder, score

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What to evaluate.

    Attributes:
        context_lengths: total lengths (prompt + answer tokens) to test.
        depths: needle depths in [0, 1] for the needle grid.
        num_samples: samples per needle cell and per (RULER task, length).
        tasks: any of ``needle``, ``ruler``, ``loss``.
        ruler_tasks: which RULER-style tasks to run.
        seed: seed of task generation and of held-out document choice.
        batch_size: prompts (or documents) per forward pass.
        loss_data: indexed-dataset prefixes of held-out long documents (``loss`` task).
        loss_length: window scored per document; ``None``: the largest evaluated context length.
        loss_num_documents: held-out documents scored.
        num_position_buckets: position buckets of the loss analysis (doubling edges).
        plots: write PNG plots.
        extrapolate: also evaluate lengths beyond the model's ``max_position_embeddings`` (RoPE
            runs at any position): how a model trained at one length does at the next stage's
            length, e.g. ``make demo``'s stage-1 model at the stage-2 length. Off by default:
            such lengths are skipped and recorded with the reason.
    """

    context_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    num_samples: int = 4
    tasks: list[str] = field(default_factory=lambda: ["needle", "ruler", "loss"])
    ruler_tasks: list[str] = field(default_factory=lambda: list(RULER_TASKS))
    seed: int = 0
    batch_size: int = 4
    loss_data: list[str] = field(default_factory=list)
    loss_length: int | None = None
    loss_num_documents: int = 8
    num_position_buckets: int = 8
    plots: bool = True
    extrapolate: bool = False

    def __post_init__(self) -> None:
        bad = sorted(set(self.tasks) - {"needle", "ruler", "loss"})
        if bad:
            raise ValueError(f"unknown eval tasks {bad}; choose from needle, ruler, loss")
        bad = sorted(set(self.ruler_tasks) - set(RULER_TASKS))
        if bad:
            raise ValueError(f"unknown RULER tasks {bad}; choose from {', '.join(RULER_TASKS)}")
        if not self.context_lengths or any(int(x) < 64 for x in self.context_lengths):
            raise ValueError(f"context_lengths must be integers >= 64, got {self.context_lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"needle depths must lie in [0, 1], got {self.depths}")
        for name in ("num_samples", "batch_size", "loss_num_documents", "num_position_buckets"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "loss" in self.tasks and not self.loss_data:
            raise ValueError(
                "the loss task needs held-out data: set loss_data to indexed-dataset "
                "prefixes (or drop 'loss' from tasks)"
            )

    @classmethod
    def from_dict(cls, raw: dict | None) -> EvalSettings:
        """Builds settings from a mapping (a recipe's ``eval:`` block); unknown keys are errors."""
        raw = dict(raw or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        check_keys(raw, fields, "eval", noun="eval settings", error=ValueError)
        return cls(**raw)


def _build_samples(make, keys: list[tuple], too_short: list[dict], task: str) -> list[Sample]:
    """Calls ``make(*key)`` per key; a context too short for the task is recorded, not fatal (the
    lengths below a task's minimum are left out before this, see :func:`task_min_lengths`)."""
    out = []
    for key in keys:
        try:
            out.append(make(*key))
        except ValueError as e:
            entry = {"task": task, "length": key[0], "reason": str(e)}
            if entry not in too_short:
                logger.debug("not running %s at length %d: %s", task, key[0], e)
                too_short.append(entry)
    return out


def _min_length(make, lo: int = 64, hi: int = 1 << 22) -> int | None:
    """Smallest length at which ``make(length)`` builds a sample (binary search: a longer context
    only adds haystack), or None when even ``hi`` is too short."""

    def ok(n: int) -> bool:
        try:
            make(n)
            return True
        except ValueError:
            return False

    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def task_min_lengths(builder: TaskBuilder, settings: EvalSettings) -> dict[str, int | None]:
    """The context length each selected task needs (its prompt's fixed parts and needles), with
    this tokenizer: lengths below it are not run for that task."""
    tasks = (["needle"] if "needle" in settings.tasks else []) + (
        list(settings.ruler_tasks) if "ruler" in settings.tasks else []
    )
    return {t: _min_length(lambda n, t=t: builder.build(t, n, settings.seed, 0)) for t in tasks}


def _run_generation(model, samples: list[Sample], batch_size: int) -> list[dict]:
    rows = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        outs = model.generate([s.prompt for s in batch], max(s.max_new_tokens for s in batch))
        for s, out in zip(batch, outs):
            pred = model.tokenizer.decode(out[: s.max_new_tokens])
            frac = score(pred, s.answers)
            rows.append(
                {
                    "task": s.task,
                    "length": s.length,
                    "depth": s.depth,
                    "index": s.index,
                    "prompt_tokens": len(s.prompt),
                    "answers": s.answers,
                    "prediction": pred,
                    "score": frac,
                    "exact": float(frac == 1.0),
                }
            )
    return rows


def _split_lengths(settings: EvalSettings, max_length: int) -> tuple[list[int], list[dict]]:
    ok, skipped = [], []
    for length in sorted({int(x) for x in settings.context_lengths}):
        if length > max_length and not settings.extrapolate:
            skipped.append(
                {
                    "length": length,
                    "reason": f"beyond the model's max_position_embeddings {max_length}",
                }
            )
        else:
            ok.append(length)
    return ok, skipped


def evaluate_model(model, out_dir: str, settings: EvalSettings | dict | None = None) -> dict:
    """Runs the evaluation on a loaded model (:class:`~megatron_longctx.eval.model.EvalModel`).

    Returns:
        The results dict (also written to ``{out_dir}/eval_results.json``).
    """
    if not isinstance(settings, EvalSettings):
        settings = EvalSettings.from_dict(settings)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    lengths, skipped = _split_lengths(settings, model.max_length)
    for s in skipped:
        logger.warning("skipping length %d: %s", s["length"], s["reason"])
    builder = TaskBuilder(model.tokenizer)
    results: dict = {
        "model": model.info,
        "settings": dataclasses.asdict(settings),
        "seed": settings.seed,
        "lengths": {"evaluated": lengths, "skipped": skipped},
    }
    too_short: list[dict] = []
    results["lengths"]["too_short_for_task"] = too_short
    needs = task_min_lengths(builder, settings) if lengths else {}
    results["lengths"]["task_min_length"] = needs
    runnable = {t: [L for L in lengths if n is not None and L >= n] for t, n in needs.items()}
    if any(runnable[t] != lengths for t in needs):  # said once per evaluation
        logger.warning(
            "context each task needs: %s; a task is not run below its length",
            ", ".join(f"{t} >= {n}" for t, n in needs.items()),
        )
    plots = {}
    if "needle" in settings.tasks and lengths:
        samples = _build_samples(
            builder.needle,
            [
                (L, d, settings.seed, i)
                for d in settings.depths
                for L in runnable["needle"]
                for i in range(settings.num_samples)
            ],
            too_short,
            "needle",
        )
        rows = _run_generation(model, samples, settings.batch_size)
        all_lengths = sorted({int(x) for x in settings.context_lengths})
        grid = [
            [
                _mean([r["exact"] for r in rows if r["depth"] == d and r["length"] == L])
                for L in all_lengths
            ]
            for d in settings.depths
        ]
        results["needle"] = {
            "lengths": all_lengths,
            "depths": settings.depths,
            "grid": grid,
            "accuracy": _mean([r["exact"] for r in rows]),
            "samples": rows,
        }
        if settings.plots:
            plots["needle_heatmap"] = os.path.join(out_dir, "needle_heatmap.png")
            from megatron_longctx.eval.plots import needle_heatmap

            needle_heatmap(grid, all_lengths, settings.depths, plots["needle_heatmap"])
    if "ruler" in settings.tasks and lengths:
        ruler = {}
        for task in settings.ruler_tasks:
            samples = _build_samples(
                lambda L, i, t=task: builder.build(t, L, settings.seed, i),
                [(L, i) for L in runnable[task] for i in range(settings.num_samples)],
                too_short,
                task,
            )
            rows = _run_generation(model, samples, settings.batch_size)
            ruler[task] = {
                "by_length": {
                    str(L): _mean([r["exact"] for r in rows if r["length"] == L]) for L in lengths
                },
                "accuracy": _mean([r["exact"] for r in rows]),
                "partial": _mean([r["score"] for r in rows]),
                "samples": rows,
            }
        results["ruler"] = ruler
    if "loss" in settings.tasks:
        length = settings.loss_length or (max(lengths) if lengths else model.max_length)
        if length > model.max_length and not settings.extrapolate:
            results["loss_by_position"] = {
                "skipped": f"loss_length {length} is beyond the "
                f"model's max_position_embeddings {model.max_length}"
            }
        else:
            res = loss_by_position(
                model,
                settings.loss_data,
                length,
                settings.loss_num_documents,
                settings.seed,
                settings.num_position_buckets,
                settings.batch_size,
            )
            results["loss_by_position"] = res
            if settings.plots:
                from megatron_longctx.eval.plots import loss_plot

                plots["loss_by_position"] = os.path.join(out_dir, "loss_by_position.png")
                loss_plot(res, plots["loss_by_position"])
    results["plots"] = plots
    results["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(out_dir, "eval_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(format_report(results))
    return results


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def format_report(results: dict) -> str:
    """A markdown table of the results (exact match per task and length, loss by bucket)."""
    lengths = results["lengths"]["evaluated"]
    lines = [
        f"# Long-context evaluation: {results['model'].get('model_dir', '?')}",
        "",
        f"max_position_embeddings {results['model'].get('max_position_embeddings')}, "
        f"seed {results['seed']}",
        "",
        "| task | " + " | ".join(map(str, lengths)) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    if "needle" in results:
        by_len = {
            L: _mean([r["exact"] for r in results["needle"]["samples"] if r["length"] == L])
            for L in lengths
        }
        lines.append("| needle | " + " | ".join(fmt(by_len[L]) for L in lengths) + " |")
    for task, res in results.get("ruler", {}).items():
        if res["accuracy"] is None:  # run at no length: named in the footnote below
            continue
        lines.append(
            f"| {task} | " + " | ".join(fmt(res["by_length"][str(L)]) for L in lengths) + " |"
        )
    needs = results["lengths"].get("task_min_length") or {}
    short = {t: n for t, n in needs.items() if n is None or any(L < n for L in lengths)}
    if short:
        lines.append(
            "\n- : not run, the context is shorter than the task needs ("
            + ", ".join(f"{t} >= {n if n is not None else '?'} tokens" for t, n in short.items())
            + ")"
        )
    for s in results["lengths"]["skipped"]:
        lines.append(f"\nskipped length {s['length']}: {s['reason']}")
    loss = results.get("loss_by_position")
    if loss and "bucket_loss" in loss:
        e = loss["bucket_edges"]
        lines += [
            "",
            f"Loss by position ({len(loss['documents'])} documents of {loss['length']} "
            f"tokens; mean {loss['mean_loss']:.3f})",
            "",
            "| positions | loss |",
            "|---|---|",
        ]
        lines += [f"| {a}-{b} | {v:.3f} |" for a, b, v in zip(e[:-1], e[1:], loss["bucket_loss"])]
    lines += [""] + [f"![{k}]({os.path.basename(v)})" for k, v in results.get("plots", {}).items()]
    return "\n".join(lines) + "\n"


def evaluate(
    model_dir: str,
    out_dir: str,
    settings: EvalSettings | dict | None = None,
    *,
    tokenizer_type: str | None = None,
    tokenizer_model: str | None = None,
) -> dict:
    """Evaluates an HF export directory (transformers, offline) and writes results to ``out_dir``.

    Args:
        model_dir: HF directory (``config.json`` + weights; ``tokenizer.json`` optional).
        out_dir: where ``eval_results.json``, ``report.md`` and the PNG plots go.
        settings: :class:`EvalSettings` or a mapping of its fields (``None``: defaults).
        tokenizer_type: project tokenizer type, when the directory has no ``tokenizer.json``.
        tokenizer_model: the tokenizer file for ``tokenizer_type``.

    Returns:
        The results dict.
    """
    tokenizer = load_eval_tokenizer(model_dir, tokenizer_type, tokenizer_model)
    return evaluate_model(HFEvalModel(model_dir, tokenizer), out_dir, settings)


def evaluate_checkpoint(
    ckpt_dir: str,
    out_dir: str,
    settings: EvalSettings | dict | None = None,
    tokenizer_type: str | None = None,
    tokenizer_model: str | None = None,
    verify: str = "rope",
) -> dict:
    """Exports a megatron checkpoint to HF (``checkpoint.hf.mcore_to_hf``) into ``{out_dir}/hf``
    and evaluates it.

    Args:
        verify: the export parity gate (``checkpoint.hf.verify``): "rope" (default here: the
            exported RoPE must reproduce the trained one up to the trained length; the
            evaluation itself then runs the export), "full" (also a logits probe, as
            ``mcore-to-hf`` does by default) or "none".

    Raises:
        RuntimeError: the conversion failed or the export does not match the trained model.
    """
    from megatron_longctx.checkpoint.hf import ConversionError, mcore_to_hf

    hf_dir = os.path.join(out_dir, "hf")
    try:
        mcore_to_hf(ckpt_dir, hf_dir, verify=verify)
    except ConversionError as err:
        raise RuntimeError(f"exporting {ckpt_dir} to HF failed: {err}") from err
    return evaluate(
        hf_dir, out_dir, settings, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model
    )
