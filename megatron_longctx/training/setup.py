"""Parallel setup, called once in this order: wrap the model for DP (megatron DDP), wire megatron's
grad finalisation into the config, build megatron's optimizer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimizerSettings:
    """AdamW with ProLong's defaults.

    Attributes:
        lr: peak learning rate. min_lr: floor of the cosine schedule.
        weight_decay / adam_beta1 / adam_beta2 / adam_eps: AdamW hyper-parameters.
        clip_grad: global gradient-norm clip (0 disables).
    """

    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


def wrap_ddp(model_chunks: list, *, overlap_grad_reduce: bool = False, bucket_size: int | None = None):
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
        use_distributed_optimizer=False,
        bucket_size=bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            disable_bucketing=(i > 0),
        ))
    config = wrapped[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if overlap_grad_reduce:
        config.grad_sync_func = ([c.start_grad_sync for c in wrapped] if len(wrapped) > 1
                                 else wrapped[0].start_grad_sync)
    return wrapped


def build_optimizer(model_chunks: list, settings: OptimizerSettings, *, bf16: bool = False):
    """megatron-core's optimizer (non-distributed; see MEGATRON_ON_CPU.md for why)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        use_distributed_optimizer=False,
    )
    return get_megatron_optimizer(config, model_chunks)
