"""Build: (config, stage index) -> a typed ``StageRun``, every piece the stage loop touches.

Called once per stage, in this order (torchtitan's / OLMo-core's "build everything from typed
config first"):
  1. megatron groups for the stage's layout (validated first, with the arithmetic in errors),
     seeds;
  2. the model with the stage's RoPE (theta / scaling) and core attention (model/specs.py),
     megatron DDP, megatron's AdamW with the stage's LR;
  3. the stage's loader (at consumed samples 0; checkpoint/start.py restores it with the model);
  4. this rank's batch path (CP rank / group, sharding, sequence-parallel padding, device).
The LR scheduler is made by ``new_scheduler`` when the start point says when (before loading a
resumed stage, after loading a transition), so it is not built here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_longctx.config.schema import ExperimentConfig, OptimizerSettings, StageConfig
from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.model.config import ModelConfig
from megatron_longctx.training.batch import BatchSharding


@dataclass
class StageRun:
    """One stage's state, built by ``build_stage``; the loop and its callbacks read it.

    Attributes:
        cfg / index: the experiment and the stage's position in it.
        model_cfg: the model as trained in this stage (its RoPE and trained length).
        chunks / optimizer / scheduler: megatron DDP model chunks, optimizer, LR scheduler.
        loader: this DP rank's resumable loader. shard: this rank's batch path.
        settings: the optimizer settings with this stage's LR.
        step / iteration: steps done in this stage / in the whole run.
        metrics: the run's MetricsLogger (callbacks add figures through it).
    """

    cfg: ExperimentConfig
    index: int
    model_cfg: ModelConfig
    chunks: list
    optimizer: Any
    loader: MixtureLoader
    shard: BatchSharding
    settings: OptimizerSettings
    scheduler: Any = None
    step: int = 0
    iteration: int = 0
    metrics: Any = None
    lineage: dict = field(default_factory=dict)  # checkpoint/lineage.py: source model facts

    @property
    def stage(self) -> StageConfig:
        return self.cfg.stages[self.index]

    @property
    def total(self) -> int:
        return self.stage.num_steps

    def new_scheduler(self):
        """A fresh LR schedule for this stage (warmup, then decay to the floor)."""
        from megatron_longctx.training.setup import build_scheduler

        return build_scheduler(
            self.optimizer,
            self.settings,
            total_steps=self.total,
            warmup_ratio=self.stage.warmup_ratio,
            decay_style=self.stage.lr_decay_style,
        )

    def checkpoint_state(self, resolved: dict) -> dict:
        """The common (non-tensor) state saved with every checkpoint of this stage."""
        return {
            "stage_index": self.index,
            "stage_name": self.stage.name,
            "stage_step": self.step,
            "stage_steps": self.total,
            "consumed_samples": self.loader.consumed_samples,
            "loader": self.loader.state_dict(),
            "iteration": self.iteration,
            "model": self.model_cfg.to_dict(),
            "config": resolved,
            **self.lineage,
        }


def build_stage(
    cfg: ExperimentConfig, index: int, device: torch.device, config_dir: str | Path | None = None
) -> StageRun:
    """Builds stage ``index`` of ``cfg`` on ``device`` (see the module docstring for the order)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.specs import (
        core_attention_name,
        core_attention_spec,
        resolve_backend,
    )
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.data import build_stage_loader
    from megatron_longctx.training.setup import build_optimizer, wrap_ddp

    stage, training = cfg.stages[index], cfg.training
    model_cfg, layout = cfg.model_config(stage), stage.parallel
    # 1. groups and seeds
    dp = stage.validate_layout(model_cfg, dist.get_world_size())
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed + index)
    torch.manual_seed(cfg.seed + index)
    # 2. model and optimizer
    settings = cfg.optimizer.for_stage(stage)
    cp = layout.context_parallel_size
    backend = resolve_backend(training.backend, device)  # resolved once, for the device
    attention = (stage.core_attention, backend, cp)
    # Transformer Engine's attention only knows per-document zigzag units with equal chunks
    sharding = "document" if core_attention_name(*attention) == "te" else stage.cp_sharding
    model = build_gpt_model(
        model_cfg,
        layout,
        backend=backend,
        core_attention=core_attention_spec(*attention, training.attention_kernel),
        recompute=stage.recompute,
        seq_length=stage.seq_length,
        params_dtype=training.params_dtype,
        rope_fusion=sharding != "balanced",  # TE's fused RoPE assumes equal chunks
        device=device,
        loss_chunk_tokens=stage.resolved_loss_chunk_tokens,  # None: megatron's unchunked loss
    )
    model.config.variable_seq_lengths = layout.pipeline_model_parallel_size > 1  # THD lengths vary
    chunks = wrap_ddp([model], use_distributed_optimizer=settings.use_distributed_optimizer)
    optimizer = build_optimizer(chunks, settings, params_dtype=training.params_dtype)
    # 3. data
    loader = build_stage_loader(
        cfg,
        stage,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        base_dir=config_dir,
        cp_sharding=sharding,
    )
    # 4. this rank's batch path
    shard = BatchSharding.for_layout(layout, sharding, device)
    return StageRun(cfg, index, model_cfg, chunks, optimizer, loader, shard, settings)
