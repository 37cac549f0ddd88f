"""Parallel setup, called once in this order: wrap the model for DP (megatron DDP), wire megatron's
grad finalisation into the config, build megatron's optimizer."""

from __future__ import annotations

import torch

from megatron_longctx.config.schema import OptimizerSettings  # the one settings type


def wrap_ddp(
    model_chunks: list,
    *,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
    use_distributed_optimizer: bool = False,
):
    """Megatron DDP around each chunk; grads land in fp32 ``main_grad`` buffers, summed over DP
    (the per-token loss scaling divides by the global token count later)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=(i > 0),
            )
        )
    config = wrapped[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if overlap_grad_reduce:
        config.grad_sync_func = (
            [c.start_grad_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
        )
    return wrapped


def build_optimizer(
    model_chunks: list,
    settings: OptimizerSettings,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_distributed_optimizer: bool | None = None,
):
    """megatron-core's optimizer for parameters in ``params_dtype``: FP32Optimizer for fp32,
    Float16OptimizerWithFloat16Params (fp32 main copies; dynamic loss scaling for fp16) or, with
    ``settings.use_distributed_optimizer`` (unless given here), the DistributedOptimizer.
    ``model.config.grad_scale_func`` is pointed at the optimizer's loss scale, as Megatron-LM's
    ``setup_model_and_optimizer`` does. Without TE / apex (every CPU run, and a GPU install
    without them) megatron falls back to torch's AdamW; checkpoint/dist.py saves the distributed
    optimizer in the format that works with it."""
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=(
            settings.use_distributed_optimizer
            if use_distributed_optimizer is None
            else use_distributed_optimizer
        ),
    )
    # Standard Megatron/HF convention: no weight decay on biases and 1-D tensors (norm weights).
    optimizer = get_megatron_optimizer(
        config, model_chunks, config_overrides=get_standard_config_overrides(config)
    )
    model_chunks[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(
    optimizer,
    settings: OptimizerSettings,
    *,
    total_steps: int,
    warmup_ratio: float = 0.1,
    decay_style: str = "cosine",
):
    """megatron-core's OptimizerParamScheduler in steps: linear warmup from 0 over
    ``warmup_ratio x total_steps``, then ``decay_style`` down to ``min_lr`` at ``total_steps``.

    It also sets each param group's weight decay (``weight_decay x wd_mult``: 0 for norms/biases),
    so it must exist before the first optimizer step. The groups' peak / floor LRs are set to
    ``settings`` first: after a stage transition they carry the previous stage's.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = settings.lr, settings.min_lr
    warmup = int(round(warmup_ratio * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
