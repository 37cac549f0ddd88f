"""Where a run starts, and restoring a stage's state from there: the one owner of that decision.

A run starts from the newest complete checkpoint in ``save_dir`` (``find_start``):
  * none: the first stage, fresh (or ``init_from`` a converted HF model: weights only);
  * one inside a stage: resume it (model + Adam + LR schedule + loader state + RNG);
  * one at a stage's last step: a transition into the next stage (model + Adam moments,
    resharded if the layout changed; the LR schedule restarts with warmup).
``restore`` applies a start point to a freshly built stage; ``StartPoint.after_stage`` is where the
next stage of the same run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from megatron_longctx.checkpoint.dist import (
    CheckpointError,
    find_latest,
    iteration_dir,
    load_checkpoint,
    read_state,
)
from megatron_longctx.checkpoint.init_from import resolve_checkpoint
from megatron_longctx.runtime.distributed import log0


@dataclass(frozen=True)
class StartPoint:
    """Attributes:
    stage_index: the stage to run first.
    resume: a checkpoint inside that stage to resume (None: the stage starts at step 0).
    transition: the previous stage's final checkpoint (weights + Adam moments), or None.
    iteration: steps done in the run so far.
    """

    stage_index: int
    resume: Path | None = None
    transition: Path | None = None
    iteration: int = 0

    def after_stage(self, save_dir: str | Path, iteration: int) -> StartPoint:
        """The next stage, continuing from this stage's final checkpoint."""
        return StartPoint(self.stage_index + 1, None, iteration_dir(save_dir, iteration), iteration)


def find_start(stages: list, save_dir: str | Path) -> StartPoint:
    """The start point for ``stages`` (each with ``name`` and ``num_steps``) in ``save_dir``."""
    latest = find_latest(save_dir)
    if latest is None:
        return StartPoint(0)
    ckpt = iteration_dir(save_dir, latest)
    state = read_state(ckpt)["state"]
    names = [s.name for s in stages]
    if state.get("stage_name") not in names:
        raise CheckpointError(
            f"checkpoint {ckpt} is from stage {state.get('stage_name')!r}, which this "
            f"config does not have (stages: {names}); use another checkpoint.save_dir"
        )
    idx = names.index(state["stage_name"])
    if state["stage_step"] >= stages[idx].num_steps:
        return StartPoint(idx + 1, None, ckpt, state["iteration"])
    return StartPoint(idx, ckpt, None, state["iteration"])


class Restorable(Protocol):
    """What ``restore`` needs of a built stage (training/state.py's StageRun)."""

    chunks: list
    optimizer: Any
    loader: Any
    model_cfg: Any
    stage: Any

    def new_scheduler(self) -> Any: ...


def restore(point: StartPoint, run: Restorable) -> tuple[Any, int]:
    """Collective. Loads what ``point`` says into ``run``; returns (LR scheduler, stage step).

    Resume: the scheduler is built first and loaded with everything else, the loader's own state
    comes back with it (a changed mixture or index is refused by the loader). Transition: weights
    and Adam moments first, then a fresh scheduler (warmup again at the new stage's LR).
    ``init_from`` (first stage only, no checkpoint yet): weights only.
    """
    stage, expect = run.stage, run.model_cfg.to_dict()
    if point.resume is not None:
        scheduler = run.new_scheduler()
        state = load_checkpoint(point.resume, run.chunks, run.optimizer, scheduler, expect)
        run.loader.load_state_dict(
            state.get("loader") or {"consumed_samples": state["consumed_samples"]}
        )
        log0(f"resumed stage {stage.name!r} at step {state['stage_step']} from {point.resume}")
        return scheduler, state["stage_step"]
    if point.transition is not None:
        load_checkpoint(point.transition, run.chunks, run.optimizer, None, expect)
        log0(
            f"stage {stage.name!r}: weights and Adam moments from {point.transition}; LR "
            f"restarts; RoPE theta {run.model_cfg.rope_theta:g}, scaling "
            f"{run.model_cfg.rope_scaling}"
        )
        return run.new_scheduler(), 0
    if stage.init_from:  # the converter's --save folder or an iter_* folder
        load_checkpoint(resolve_checkpoint(stage.init_from), run.chunks, None, None, expect)
        # bf16 / fp16 and the distributed optimizer keep fp32 main copies taken when the
        # optimizer was built and write them back after every step: refresh them from the loaded
        # weights (Megatron-LM's load_checkpoint does the same when it skips the optimizer).
        run.optimizer.reload_model_params()
        log0(f"stage {stage.name!r}: initialised from {stage.init_from}")
    return run.new_scheduler(), 0
