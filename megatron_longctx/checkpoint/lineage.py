"""What a run inherits from the model it started from, carried in every checkpoint it writes.

A model trained here is exported (``checkpoint/hf/mcore_to_hf.py``) long after its source is
forgotten, so each checkpoint's common state carries:
  * ``hf_config`` / ``hf_dtype``: the source HF model's config.json (its special-token ids:
    bos, eos, pad, unk) and weight dtype, from the ``init_from`` checkpoint (hf-to-mcore writes
    them) through every stage;
  * ``max_context``: the longest context the model has been trained or pretrained on: the source
    model's ``max_position_embeddings`` and every stage's ``seq_length`` so far. A later, shorter
    stage (64K after 512K, an SFT stage at 8K) never shortens it; the export writes it as
    ``max_position_embeddings``.
The run's tokenizer is kept beside its checkpoints (``<save_dir>/hf_tokenizer``, where
hf-to-mcore keeps the source's), so an export carries it: the recipe's ``data.tokenizer_model``
when it names a Hugging Face tokenizer, else the ``init_from`` model's.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from megatron_longctx.checkpoint.hf.hf_io import copy_tokenizer_files
from megatron_longctx.checkpoint.init_from import checkpoint_state, resolve_checkpoint

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "hf_tokenizer"  # the converter's name (hf_to_mcore.TOKENIZER_SUBDIR)
CARRIED = ("hf_config", "hf_dtype")


def _from_state(state: dict) -> dict:
    out = {k: state[k] for k in CARRIED if state.get(k) is not None}
    model = state.get("model") or {}
    out["max_context"] = max(
        int(state.get("max_context") or 0), int(model.get("max_position_embeddings") or 0)
    )
    return out


def start_lineage(point, stages: list) -> dict:
    """The inherited facts at ``point`` (checkpoint/start.py's StartPoint): from the checkpoint
    it resumes or continues, else the first stage's ``init_from``, else none (a fresh model)."""
    ckpt = point.resume or point.transition
    if ckpt is None and point.stage_index == 0 and stages[0].init_from:
        ckpt = resolve_checkpoint(stages[0].init_from)
    if ckpt is None:
        return {}
    return _from_state(checkpoint_state(ckpt)[1])


def for_stage(lineage: dict, seq_length: int) -> dict:
    """``lineage`` once a stage of ``seq_length`` tokens has trained."""
    return {**lineage, "max_context": max(int(lineage.get("max_context") or 0), seq_length)}


def _tokenizer_source(tokenizer_model: str | None) -> Path | None:
    if not tokenizer_model:
        return None
    path = Path(tokenizer_model)
    return path if path.is_dir() else path.parent if path.is_file() else None


def keep_tokenizer(save_dir: str | Path, tokenizer_model: str | None, init_from: str | None):
    """Rank 0, before training: copies the run's tokenizer to ``<save_dir>/hf_tokenizer`` (the
    recipe's, else the ``init_from`` model's) unless one is there. Returns the files copied."""
    dest = Path(save_dir) / TOKENIZER_SUBDIR
    if dest.is_dir() and any(dest.iterdir()):
        return []
    sources = [_tokenizer_source(tokenizer_model)]
    if init_from:
        sources.append(resolve_checkpoint(init_from).parent / TOKENIZER_SUBDIR)
    for src in sources:
        if src is None or not src.is_dir():
            continue
        copied = copy_tokenizer_files(src, dest)
        if not copied and tokenizer_model and Path(tokenizer_model).suffix == ".model":
            dest.mkdir(parents=True, exist_ok=True)  # a sentencepiece model: HF's file name
            shutil.copyfile(tokenizer_model, dest / "tokenizer.model")
            copied = ["tokenizer.model"]
        if copied:
            logger.info("tokenizer for exports: %s -> %s (%s)", src, dest, ", ".join(copied))
            return copied
    return []
