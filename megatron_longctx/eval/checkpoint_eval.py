"""The in-process evaluation of a megatron checkpoint on N processes with a chosen TP / PP / CP.

``tools/eval_longctx.py --megatron`` runs this under torchrun / srun (one process per GPU):

    process group (runtime/distributed.py) -> megatron groups for the layout
    -> the checkpoint's model (its own RoPE, from the checkpoint's common state) built for the
       layout and loaded through dist_checkpointing (resharded from the trained layout)
    -> eval/in_process.py's teacher-forced evaluation at ``seq_length``

No export, no transformers: the same code as the stage-end evaluation, at any layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_longctx.parallel.layout import ParallelLayout

logger = logging.getLogger(__name__)


def load_megatron_for_eval(
    ckpt_dir: str | Path,
    layout: ParallelLayout,
    *,
    core_attention: str = "auto",
    backend: str = "auto",
    attention_kernel: str = "auto",
    seq_length: int | None = None,
    bf16: bool = False,
    cp_sharding: str = "balanced",
    seed: int = 0,
    device: torch.device | None = None,
):
    """Collective: (scorer, model config, checkpoint) for ``ckpt_dir`` at ``layout`` (megatron
    groups initialised here; the process group must exist).

    Args:
        seq_length: longest packed sequence; None: the model's ``max_position_embeddings``.
        bf16: build the model in bf16 (the recipes' precision), else fp32.
        device: the device to run on (None: runtime/device.py's ``choose_device``).
    """
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_longctx.checkpoint.dist import load_checkpoint, read_state
    from megatron_longctx.checkpoint.hf.mcore_to_hf import resolve_checkpoint
    from megatron_longctx.eval.megatron_model import MegatronScorer
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import ModelConfig
    from megatron_longctx.model.specs import (
        core_attention_name,
        core_attention_spec,
        resolve_backend,
    )
    from megatron_longctx.runtime.device import choose_device
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.batch import BatchSharding

    ckpt = resolve_checkpoint(ckpt_dir)
    cfg = ModelConfig(**dict(read_state(ckpt)["state"]["model"]))
    layout.validate_world_size(dist.get_world_size())
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cp = layout.context_parallel_size
    device = device or choose_device()
    backend = resolve_backend(backend, device)  # once, for the device (as build_stage does)
    attention = (core_attention, backend, cp)
    sharding = "document" if core_attention_name(*attention) == "te" else cp_sharding
    seq = int(seq_length or cfg.max_position_embeddings)
    model = build_gpt_model(
        cfg,
        layout,
        backend=backend,
        core_attention=core_attention_spec(*attention, attention_kernel),
        seq_length=seq,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        rope_fusion=sharding != "balanced",
        device=device,
    )
    model.config.variable_seq_lengths = layout.pipeline_model_parallel_size > 1
    load_checkpoint(ckpt, [model], expect_model=cfg.to_dict())
    shard = BatchSharding.for_layout(layout, sharding, device)
    return MegatronScorer([model], shard, cfg.vocab_size, seq), cfg, ckpt


def evaluate_megatron_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str,
    settings,
    tokenizer,
    layout: ParallelLayout,
    **load_kwargs,
) -> dict:
    """Collective: loads ``ckpt_dir`` at ``layout`` and runs the teacher-forced evaluation.

    Returns:
        The results dict (every rank); rank 0 writes it under ``out_dir``.
    """
    from megatron_longctx.eval.in_process import evaluate_in_process

    scorer, cfg, ckpt = load_megatron_for_eval(ckpt_dir, layout, **load_kwargs)
    import torch.distributed as dist

    desc = f"{layout.describe(dist.get_world_size() // layout.model_parallel_size)}"
    results = evaluate_in_process(
        scorer, tokenizer, settings, out_dir, layout=f"{desc}, S={scorer.seq_length}",
        title=str(ckpt),
    )
    results["checkpoint"] = str(ckpt)
    return results
