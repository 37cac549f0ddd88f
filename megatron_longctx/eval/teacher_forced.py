"""The in-process long-context evaluation: tasks -> scoring requests -> results, report, plots.

Runs on every rank of a megatron job with its layout (``eval/megatron_model.py``); the tasks are
scored by teacher forcing in one forward pass each, so no decoding loop runs at 512K tokens:

* ``needle`` (lengths x depths), ``niah_multikey`` (eval/tasks.py's prompts, RULER-style) and
  ``json_kv`` (eval/json_kv.py, HELMET-style): the answer's tokens (``encode(" " + answer)``)
  follow the prompt. ``tf_exact``: every answer token is the model's argmax given the prompt and
  the earlier answer tokens, which is exactly "greedy decoding starts with the answer tokens".
  ``answer_logprob``: the answer's mean per-token log-likelihood (nats).
* ``loss``: loss by position over held-out long documents at the full training length
  (eval/loss_position.py's windows and buckets).

Results use the HF route's layout where they overlap (``loss_by_position``, the needle ``grid``),
so eval/plots.py draws them; ``format_tf_report`` writes the markdown report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from megatron_longctx.config.loading import check_keys
from megatron_longctx.eval.json_kv import json_kv
from megatron_longctx.eval.loss_position import bucket_edges, held_out_windows
from megatron_longctx.eval.packing import ScoreRequest
from megatron_longctx.eval.tasks import Sample, TaskBuilder

logger = logging.getLogger(__name__)

TF_TASKS = ("needle", "niah_multikey", "json_kv", "loss")


@dataclass
class TeacherForcedSettings:
    """What the in-process evaluation runs (a stage's ``eval_settings.in_process``).

    Attributes:
        context_lengths: prompt + answer lengths; None: the stage's sequence length. Lengths
            above the sequence length are skipped and recorded.
        depths: needle depths in [0, 1].
        num_samples: samples per needle cell and per (task, length).
        tasks: any of ``needle``, ``niah_multikey``, ``json_kv``, ``loss``.
        seed: task generation and held-out document choice.
        loss_data: held-out indexed-dataset prefixes (``loss``).
        loss_length: tokens per held-out window; None: the stage's sequence length.
        loss_num_documents: held-out documents.
        num_position_buckets: position buckets (doubling edges).
        max_forward_tokens: the cost guard: refuse (log, record, skip) an evaluation whose
            forward tokens exceed this; None: no bound.
        max_seconds: refuse one whose estimated time (from the trainer's measured tok/s)
            exceeds this; None: no bound.
        plots: write the PNG plots.
    """

    context_lengths: list[int] | None = None
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    num_samples: int = 2
    tasks: list[str] = field(default_factory=lambda: ["needle", "niah_multikey", "json_kv"])
    seed: int = 0
    loss_data: list[str] = field(default_factory=list)
    loss_length: int | None = None
    loss_num_documents: int = 4
    num_position_buckets: int = 8
    max_forward_tokens: int | None = None
    max_seconds: float | None = 1800.0
    plots: bool = True

    def __post_init__(self) -> None:
        bad = sorted(set(self.tasks) - set(TF_TASKS))
        if bad:
            raise ValueError(f"unknown in-process eval tasks {bad}; choose from {TF_TASKS}")
        if self.context_lengths is not None and any(int(x) < 64 for x in self.context_lengths):
            raise ValueError(f"context_lengths must be integers >= 64, got {self.context_lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"needle depths must lie in [0, 1], got {self.depths}")
        for name in ("num_samples", "loss_num_documents", "num_position_buckets"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "loss" in self.tasks and not self.loss_data:
            raise ValueError(
                "the in-process loss task needs held-out data: set loss_data to indexed-dataset "
                "prefixes (or drop 'loss' from tasks)"
            )

    @classmethod
    def from_dict(cls, raw: dict | None) -> TeacherForcedSettings:
        """From a mapping (``eval_settings.in_process``); unknown keys are errors."""
        raw = dict(raw or {})
        names = {f.name for f in dataclasses.fields(cls)}
        check_keys(raw, names, "eval_settings.in_process", noun="in-process eval settings",
                   error=ValueError)
        return cls(**raw)


@dataclass
class Plan:
    """The requests of one evaluation and what each one is."""

    requests: list[ScoreRequest]
    samples: list[Sample | None]
    lengths: list[int]
    skipped: list[dict]
    loss_sources: list[dict]
    loss_length: int | None


def answer_request(tokenizer, sample: Sample) -> ScoreRequest:
    """The prompt followed by the answer's tokens (``encode(" " + answer)``)."""
    answer = [int(t) for t in tokenizer.encode(" " + sample.answers[0])]
    return ScoreRequest(list(sample.prompt) + answer, len(sample.prompt))


def plan(tokenizer, settings: TeacherForcedSettings, seq_length: int) -> Plan:
    """Every request of the evaluation at sequence length ``seq_length`` (pure; same on every
    rank)."""
    wanted = sorted({int(x) for x in (settings.context_lengths or [seq_length])})
    lengths = [L for L in wanted if L <= seq_length]
    skipped = [
        {"length": L, "reason": f"beyond the sequence length {seq_length}"}
        for L in wanted
        if L > seq_length
    ]
    builder, samples = TaskBuilder(tokenizer), []
    for task in settings.tasks:
        for L in lengths:
            keys = (
                [(d, i) for d in settings.depths for i in range(settings.num_samples)]
                if task == "needle"
                else [(None, i) for i in range(settings.num_samples)]
            )
            for depth, i in keys:
                try:
                    if task == "needle":
                        samples.append(builder.needle(L, depth, settings.seed, i))
                    elif task == "niah_multikey":
                        samples.append(builder.niah_multikey(L, settings.seed, i))
                    elif task == "json_kv":
                        samples.append(json_kv(tokenizer, L, settings.seed, i))
                except ValueError as err:
                    entry = {"task": task, "length": L, "reason": str(err)}
                    if entry not in skipped:
                        skipped.append(entry)
    requests = [answer_request(tokenizer, s) for s in samples]
    sources, loss_length = [], None
    if "loss" in settings.tasks:
        loss_length = min(settings.loss_length or seq_length, seq_length)
        windows, sources = held_out_windows(
            settings.loss_data, loss_length, settings.loss_num_documents, settings.seed
        )
        if max(max(w) for w in windows) >= tokenizer.vocab_size:
            raise ValueError(
                "held-out data holds token ids beyond the tokenizer's vocabulary: it was "
                "tokenized with another tokenizer; re-run preprocessing with the model's"
            )
        requests += [ScoreRequest(w, 1, per_position=True) for w in windows]
        samples += [None] * len(windows)
    return Plan(requests, samples, lengths, skipped, sources, loss_length)


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def results_of(p: Plan, scores, settings: TeacherForcedSettings) -> dict:
    """The results dict from a plan and its ``ScoreResult``."""
    rows = []
    for i, s in enumerate(p.samples):
        if s is None:
            continue
        rows.append(
            {
                "task": s.task,
                "length": s.length,
                "depth": s.depth,
                "index": s.index,
                "prompt_tokens": len(s.prompt),
                "answer": s.answers[0],
                "answer_tokens": int(scores.num_scored[i]),
                "tf_exact": bool(scores.correct[i]),
                "answer_logprob": float(scores.mean_logprob[i]),
            }
        )
    out: dict = {
        "lengths": {"evaluated": p.lengths, "skipped": p.skipped},
        "settings": dataclasses.asdict(settings),
    }
    tasks: dict = {}
    for task in ("needle", "niah_multikey", "json_kv"):
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        res = {
            "tf_exact": _mean(r["tf_exact"] for r in mine),
            "answer_logprob": _mean(r["answer_logprob"] for r in mine),
            "by_length": {
                str(L): _mean(r["tf_exact"] for r in mine if r["length"] == L) for L in p.lengths
            },
            "samples": mine,
        }
        if task == "needle":
            res["lengths"], res["depths"] = p.lengths, settings.depths
            res["grid"] = [
                [
                    _mean(r["tf_exact"] for r in mine if r["depth"] == d and r["length"] == L)
                    for L in p.lengths
                ]
                for d in settings.depths
            ]
        tasks[task] = res
    out["teacher_forced"] = tasks
    if p.loss_length is not None:
        counts = np.maximum(scores.position_count, 1)
        per_position = scores.position_nll_sum / counts
        edges = bucket_edges(p.loss_length, settings.num_position_buckets)
        out["loss_by_position"] = {
            "length": p.loss_length,
            "documents": p.loss_sources,
            "bucket_edges": edges,
            "bucket_loss": [float(per_position[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])],
            "mean_loss": float(per_position.mean()),
            "per_position": [float(x) for x in per_position],
        }
    return out


def flat_tf_scores(results: dict) -> dict[str, float]:
    """Headline figures (``tf_exact/<task>``, ``answer_logprob/<task>``, ``loss_by_position``)."""
    flat = {}
    for task, res in results.get("teacher_forced", {}).items():
        for key in ("tf_exact", "answer_logprob"):
            if res.get(key) is not None:
                flat[f"{key}/{task}"] = res[key]
    loss = results.get("loss_by_position") or {}
    if "mean_loss" in loss:
        flat["loss_by_position/mean"] = loss["mean_loss"]
        edges = loss["bucket_edges"]
        for a, b, v in zip(edges[:-1], edges[1:], loss["bucket_loss"]):
            flat[f"loss_by_position/{a}-{b}"] = v
    return flat


def format_tf_report(results: dict, title: str = "") -> str:
    """Markdown: ``tf_exact`` (and answer log-likelihood) per task and length, loss by bucket."""
    lengths = results["lengths"]["evaluated"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    cost = results.get("cost", {})
    lines = [
        f"# In-process long-context evaluation (teacher forced){': ' + title if title else ''}",
        "",
        f"layout {results.get('layout', '?')}, {cost.get('forward_tokens', '?')} forward tokens, "
        f"{results.get('seconds', '?')} s",
        "",
        "tf_exact: every answer token is the argmax (= greedy decoding starts with the answer)",
        "",
        "| task | " + " | ".join(map(str, lengths)) + " | answer logprob |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for task, res in results.get("teacher_forced", {}).items():
        lines.append(
            f"| {task} | "
            + " | ".join(fmt(res["by_length"].get(str(L))) for L in lengths)
            + f" | {fmt(res['answer_logprob'])} |"
        )
    for s in results["lengths"]["skipped"]:
        lines.append(f"\nskipped {s.get('task', 'length')} {s['length']}: {s['reason']}")
    loss = results.get("loss_by_position")
    if loss and "bucket_loss" in loss:
        e = loss["bucket_edges"]
        lines += [
            "",
            f"Loss by position ({len(loss['documents'])} documents of {loss['length']} tokens; "
            f"mean {loss['mean_loss']:.3f})",
            "",
            "| positions | loss |",
            "|---|---|",
        ]
        lines += [f"| {a}-{b} | {v:.3f} |" for a, b, v in zip(e[:-1], e[1:], loss["bucket_loss"])]
    if results.get("refused"):
        lines.append(f"\nnot run: {results['refused']}")
    lines += [""] + [f"![{k}]({os.path.basename(v)})" for k, v in results.get("plots", {}).items()]
    return "\n".join(lines) + "\n"
