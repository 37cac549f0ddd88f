"""Save / load training state with megatron dist_checkpointing; a checkpoint counts only once complete.

Directory layout under ``save_dir``::

    iter_0000040/                      one checkpoint (megatron dist_checkpointing format)
        <megatron files>               model + optimizer sharded tensors, common state
        rng/rank00000.pt               each rank's RNG states
        COMPLETE.json                  written by rank 0 after *every* rank finished writing
    latest_checkpointed_iteration.txt  a hint for humans and launchers, moved after COMPLETE.json

Rules that make resume safe under SIGKILL at any moment:
  * a directory without ``COMPLETE.json`` is never loaded (``find_latest`` ignores it);
  * ``COMPLETE.json`` and the pointer are written to a temporary name and renamed (atomic);
  * older checkpoints are deleted (retention: keep the last K) only after the newer one is complete;
  * a half-written directory for the same iteration is removed before a new save into it.

Common state stored with each checkpoint (``state``): iteration, consumed samples, stage index,
model config and the resolved experiment config, so a loader can refuse a checkpoint of another
model shape before any step runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
LATEST = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


#: The model fields a checkpoint's tensors depend on (names, shapes, which tensors exist): a
#: checkpoint whose stored model differs in one of them is another model.
SHAPE_FIELDS = (
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "tie_word_embeddings",
)


class CheckpointError(RuntimeError):
    """A missing, incomplete or incompatible checkpoint; the message says what to do."""


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(save_dir: str | Path, complete_only: bool = True) -> list[int]:
    """Iterations of the checkpoints under ``save_dir``, ascending."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    its = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and child.is_dir() and (is_complete(child) or not complete_only):
            its.append(int(m.group(1)))
    return sorted(its)


def find_latest(save_dir: str | Path) -> int | None:
    """The newest *complete* checkpoint's iteration, or None."""
    its = list_checkpoints(save_dir)
    return its[-1] if its else None


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _merged_model_sd(sd: dict) -> dict:
    return {k: v for key, part in sd.items() if key.startswith("model") for k, v in part.items()}


#: How megatron shards optimizer state in a checkpoint (Megatron-LM's
#: ``_build_sharded_state_dict_metadata`` with ``--dist-ckpt-optim-fully-reshardable``). The
#: distributed optimizer's default format ("fully_sharded_model_space") stores flattened ranges,
#: which the torch AdamW fallback (no TE / apex: every CPU run, a GPU install without them) cannot
#: save; "fully_reshardable" gathers each parameter's fp32 main copy and Adam moments into the
#: parameter's own shape, so a checkpoint reshards over DP, TP and PP on load. Ignored by the
#: other optimizers; no "chained_N." prefix, so the keys do not depend on the optimizer chain.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


def _optimizer_sharded(optimizer, model_sd: dict, is_loading: bool) -> dict:
    return optimizer.sharded_state_dict(
        _merged_model_sd(model_sd), is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA)
    )


def _fallback_distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers of ``optimizer`` that run on megatron's torch-AdamW fallback (no
    TE / apex: every CPU run, a GPU install without them); empty otherwise."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in chain if isinstance(o, distrib_optimizer.DistributedOptimizer)]


def _fresh_fallback_adam_state(optimizer) -> None:
    """megatron's DistributedOptimizer on torch's AdamW reads the step counter off the Adam state
    when it builds the sharded state dict to load into, and a freshly built optimizer has none
    yet (megatron asserts ``len(steps) == 1``). Gives every parameter the zero state torch's first
    step would create; the load then overwrites all of it (step included)."""
    for opt in _fallback_distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, except for a DistributedOptimizer on torch's AdamW:
    megatron's fully_reshardable loader copies every key of the Adam state from the checkpoint,
    torch's per-parameter ``step`` included, which the format does not store (it keeps the step
    in the param groups): KeyError 'step'. So the common part loads first (it sets the step),
    then the parameter state with ``step`` held aside. megatron also hands every parameter the
    same ``step`` tensor, which torch's AdamW increments in place once per parameter (a resumed
    run's bias correction would drift: step 16 instead of 3 after one step): each parameter gets
    its own copy back."""
    fallback = _fallback_distributed_optimizers(optimizer)
    if not fallback:
        optimizer.load_state_dict(state)
        return
    if len(getattr(optimizer, "chained_optimizers", [optimizer])) != 1:
        raise CheckpointError(
            "the distributed optimizer without Transformer Engine / apex supports one optimizer "
            "chain; install Transformer Engine (pip install '.[gpu]') for this configuration"
        )
    opt, state = fallback[0], dict(state)
    param_state = state.pop("param_state")
    kind = state.pop("param_state_sharding_type")
    if kind != "fully_reshardable":
        raise CheckpointError(
            f"the optimizer state in this checkpoint is {kind!r}; without Transformer Engine / "
            "apex only 'fully_reshardable' loads (written by this project since bf16 support)"
        )
    opt.load_state_dict(state)
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for param, step in steps.items():
            opt.optimizer.state[param]["step"] = step.clone()


def _save_strategy():
    """megatron's torch_dist format, written by one forked writer per rank (the default two
    double the forks per save for no gain on small shards)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    state: dict | None = None,
    keep_last: int | None = None,
    protected: bool = False,
    before_marker=None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    Args:
        keep_last: retention; older complete checkpoints beyond the newest K are deleted after
            this one is complete, except ``protected`` ones (e.g. the end of a stage).
        before_marker: test hook called on every rank after all files are written, before the
            completion marker (a kill there must leave the checkpoint ignored).
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(save_dir, iteration)
    if _rank() == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if final.exists():  # a leftover (incomplete, or an older run's) at this iteration
            shutil.rmtree(final)
        final.mkdir()  # empty: megatron warns "Overwriting old incomplete..." on a non-empty one
    _barrier()
    sd = _model_sharded(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = _optimizer_sharded(optimizer, sd, is_loading=False)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["state"] = dict(state or {}, iteration=iteration)
    dist_checkpointing.save(sd, str(final), sharded_strategy=_save_strategy())
    (final / "rng").mkdir(exist_ok=True)
    torch.save(
        {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        final / "rng" / f"rank{_rank():05d}.pt",
    )
    _barrier()  # every rank's files are written
    if before_marker is not None:
        before_marker(iteration)
    if _rank() == 0:
        _atomic_write(final / MARKER, json.dumps({"iteration": iteration, "protected": protected}))
        _atomic_write(Path(save_dir) / LATEST, str(iteration))
        if keep_last:
            _apply_retention(save_dir, iteration, keep_last)
    _barrier()
    return final


def _apply_retention(save_dir: str | Path, newest: int, keep_last: int) -> None:
    complete = list_checkpoints(save_dir)
    keep = set(complete[-keep_last:]) | {it for it in complete if _is_protected(save_dir, it)}
    doomed = [it for it in complete if it not in keep and it < newest]
    doomed += [
        it
        for it in list_checkpoints(save_dir, complete_only=False)
        if it not in complete and it < newest
    ]  # torn saves of earlier attempts
    for it in doomed:
        shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)
        logger.info("retention: removed checkpoint iteration %d", it)


def _is_protected(save_dir: str | Path, iteration: int) -> bool:
    try:
        return bool(
            json.loads((iteration_dir(save_dir, iteration) / MARKER).read_text()).get("protected")
        )
    except (OSError, ValueError):
        return False


def read_state(ckpt_dir: str | Path) -> dict:
    """The common (non-tensor) state of a complete checkpoint: state, scheduler."""
    from megatron.core import dist_checkpointing

    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path} has no {MARKER}: it was interrupted while being "
            "written; resume from an earlier complete checkpoint"
        )
    return dist_checkpointing.load_common_state_dict(str(path))


def load_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    expect_model: dict | None = None,
) -> dict:
    """Collective. Loads model (and optimizer/scheduler when given) in place; returns ``state``.

    Args:
        expect_model: the current model config as a dict; a checkpoint of another shape raises
            CheckpointError before any tensor is read.
    """
    from megatron.core import dist_checkpointing

    common = read_state(ckpt_dir)
    state = common.get("state", {})
    if expect_model is not None and state.get("model") is not None:
        diff = {
            k: (state["model"].get(k), expect_model.get(k))
            for k in SHAPE_FIELDS
            if state["model"].get(k) != expect_model.get(k)
        }
        if diff:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} is for another model shape "
                f"(checkpoint vs config): {diff}; point the run at a matching "
                "checkpoint or fix the model config"
            )
    from megatron_longctx.checkpoint.spec_keys import (
        checkpoint_keys,
        drop_absent_extra_state,
        load_model_state,
    )

    sd = _model_sharded(model_chunks)
    available = checkpoint_keys(ckpt_dir)  # local <-> TE spec: see checkpoint/spec_keys.py
    dropped = {key: drop_absent_extra_state(part, available) for key, part in sd.items()}
    if optimizer is not None:
        _fresh_fallback_adam_state(optimizer)
        sd["optimizer"] = _optimizer_sharded(optimizer, sd, is_loading=True)
    loaded = dist_checkpointing.load(sd, str(ckpt_dir))
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        load_model_state(_unwrap(chunk), loaded[key], dropped[key], str(ckpt_dir))
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    rng_file = Path(ckpt_dir) / "rng" / f"rank{_rank():05d}.pt"
    if rng_file.exists():
        torch.set_rng_state(torch.load(rng_file, weights_only=False)["cpu"])
    return state
