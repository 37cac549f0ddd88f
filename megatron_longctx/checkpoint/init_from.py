"""Where a pretrained model comes from: ``stages.N.init_from`` and ``model: {from_checkpoint}``.

Users point both at what the converter wrote, so every form it can take is accepted:
  * a checkpoint root (``tools/convert_checkpoint.py hf-to-mcore --save DIR``, or a training run's
    ``checkpoint.save_dir``): its newest complete ``iter_*`` checkpoint;
  * one ``iter_*`` directory (complete: it has ``COMPLETE.json``);
  * a Hugging Face Llama directory: ``model.from_checkpoint`` reads its ``config.json``;
    ``init_from`` says the one command that converts it (the trainer's ranks do not convert:
    conversion has its own TP/PP layout and output folder, which the user chooses once).
Anything else is refused naming the path and what is wrong with it (missing, interrupted, not a
checkpoint), never "interrupted" for a folder that merely holds checkpoints.

``checkpoint_model`` reads the model section a checkpoint stores (``ModelConfig.to_dict()`` in its
common state) without importing megatron; ``model_mismatch`` names the fields in which a recipe's
model differs from it (the shape fields a checkpoint's tensors depend on, tied embeddings
included), so a wrong recipe is refused at config load, not by a ``KeyError`` from
dist_checkpointing after every rank started.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from megatron_longctx.checkpoint.dist import SHAPE_FIELDS, CheckpointError

logger = logging.getLogger(__name__)

ENV_VAR = "LONGCTX_INIT_FROM"
DEPRECATED_ENV_VAR = "LONGCTX_INIT"


class InitFromError(CheckpointError, ValueError):
    """A pretrained-model path that cannot be used; the message names the path and the fix."""


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory (``config.json`` next to weights)."""
    return (path / "config.json").is_file() and any(
        p.name.endswith((".safetensors", ".safetensors.index.json", ".bin"))
        for p in path.iterdir()
    )


def convert_command(hf_dir: str | Path) -> str:
    """The one command that converts ``hf_dir`` for ``init_from``."""
    name = Path(hf_dir).resolve().name or "model"
    return (
        f"python tools/convert_checkpoint.py hf-to-mcore --hf-dir {hf_dir} "
        f"--save checkpoints/{name}_mcore"
    )


def resolve_checkpoint(path: str | Path, what: str = "init_from") -> Path:
    """The complete ``iter_*`` checkpoint ``path`` names (itself, or the newest under it).

    Args:
        path: a checkpoint root, an ``iter_*`` directory, or (refused, with the command to run)
            a Hugging Face directory.
        what: how the caller's users name this path in errors ("init_from", "--load").

    Raises:
        InitFromError: missing path, an interrupted ``iter_*`` checkpoint, an HF directory, or a
            directory holding no complete checkpoint.
    """
    from megatron_longctx.checkpoint.dist import (
        MARKER,
        find_latest,
        is_complete,
        iteration_dir,
        list_checkpoints,
    )

    p = Path(path)
    if not p.exists():
        raise InitFromError(f"{what} {p} does not exist; give the converter's --save folder")
    if not p.is_dir():
        raise InitFromError(f"{what} {p} is a file, not a checkpoint folder")
    if is_complete(p):
        return p
    if p.name.startswith("iter_") and (p / "metadata.json").exists():
        raise InitFromError(
            f"{what} {p} has no {MARKER}: it was interrupted while being written; use an "
            "earlier complete checkpoint"
        )
    latest = find_latest(p)
    if latest is not None:
        return iteration_dir(p, latest)
    if is_hf_dir(p):
        raise InitFromError(
            f"{what} {p} is a Hugging Face model, not a megatron checkpoint; convert it once with "
            f"`{convert_command(p)}` and point {what} at the --save folder"
        )
    torn = list_checkpoints(p, complete_only=False)
    if torn:
        raise InitFromError(
            f"{what} {p} holds only interrupted checkpoints (iterations {torn}, no {MARKER}); "
            "convert or train again"
        )
    raise InitFromError(
        f"{what} {p} holds no checkpoint (no iter_*/{MARKER}) and no Hugging Face model "
        "(config.json + weights); give the converter's --save folder or an iter_* folder"
    )


@lru_cache(maxsize=16)
def _common_state(path: str, mtime_ns: int) -> dict:  # keyed by the file's mtime: re-saves differ
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_state(path: str | Path, what: str = "init_from") -> tuple[Path, dict]:
    """(the resolved ``iter_*`` dir, its common ``state``), read without megatron."""
    ckpt = resolve_checkpoint(path, what)
    try:
        common = ckpt.resolve() / "common.pt"  # megatron's common state (TorchCommonLoadStrategy)
        state = _common_state(str(common), common.stat().st_mtime_ns).get("state")
        return ckpt, dict(state or {})
    except (OSError, RuntimeError, ValueError) as err:
        raise InitFromError(f"{what} {ckpt}: cannot read its common state: {err}") from err


def checkpoint_model(path: str | Path, what: str = "model.from_checkpoint") -> dict:
    """The model section stored by a converted / trained checkpoint, or read from an HF dir.

    Returns:
        ``ModelConfig`` fields as a dict (the HF dir's ``config.json`` translated by
        ``checkpoint/hf/config_map.py``; a checkpoint's stored ``ModelConfig.to_dict()``).
    """
    from megatron_longctx.checkpoint.dist import find_latest

    p = Path(path)
    if p.is_dir() and is_hf_dir(p) and find_latest(p) is None:
        from megatron_longctx.checkpoint.hf.config_map import model_config_from_hf

        source = p / "config.json"
        return model_config_from_hf(json.loads(source.read_text()), source=str(source)).to_dict()
    ckpt, state = checkpoint_state(p, what)
    if not isinstance(state.get("model"), dict):
        raise InitFromError(f"{what} {ckpt} stores no model config (state['model'])")
    model = dict(state["model"])
    model.pop("extra", None)
    return model


def model_mismatch(recipe_model: dict, stored: dict) -> dict:
    """{field: (checkpoint, recipe)} for each ``SHAPE_FIELDS`` entry that differs."""
    return {
        k: (stored.get(k), recipe_model.get(k))
        for k in SHAPE_FIELDS
        if k in stored and stored.get(k) != recipe_model.get(k)
    }


def env_init_from() -> None:
    """Keeps the recipes' old variable working: ``LONGCTX_INIT`` sets ``LONGCTX_INIT_FROM``
    (with a deprecation line) when only the old one is set."""
    old = os.environ.get(DEPRECATED_ENV_VAR)
    if old and not os.environ.get(ENV_VAR):
        logger.warning("%s is deprecated; set %s=%s instead", DEPRECATED_ENV_VAR, ENV_VAR, old)
        os.environ[ENV_VAR] = old


def check_init_from(stages: list, save_dir: str | Path) -> Path | None:
    """Before any rank starts: the checkpoint the first stage initialises from, when the run has
    no checkpoint of its own yet (a resumed run does not read ``init_from`` again).

    Raises:
        InitFromError: the path cannot be used (see ``resolve_checkpoint``).
    """
    from megatron_longctx.checkpoint.dist import find_latest

    if not stages or not stages[0].init_from or find_latest(save_dir) is not None:
        return None
    return resolve_checkpoint(stages[0].init_from, f"stage {stages[0].name!r}: init_from")
