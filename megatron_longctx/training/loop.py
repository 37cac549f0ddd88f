"""The curriculum loop, top to bottom: stages in order, each resumable, one checkpoint format.

For each stage (starting where the newest complete checkpoint left off):
  1. megatron groups for the stage's layout (validated first, with the arithmetic in errors);
  2. the model with the stage's RoPE (theta / scaling), megatron DDP, megatron's AdamW;
  3. state: resume inside the stage (model + Adam + scheduler + consumed samples + RNG), or a
     stage transition (model + Adam moments from the previous stage's last checkpoint, resharded
     if the layout changed; a fresh LR schedule with warmup), or ``init_from`` a converted HF model;
  4. the stage's loader, positioned at the consumed-samples counter;
  5. steps: forward/backward through megatron's schedule with a global token-averaged loss,
     NaN/inf check, optimizer + scheduler step, log, checkpoint every N steps and at the stage end,
     SIGTERM/SIGUSR1 or the job's wall-clock deadline -> checkpoint and exit EXIT_PREEMPTED.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longctx.checkpoint.dist import (
    find_latest,
    iteration_dir,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from megatron_longctx.config.loading import ConfigError, expand_env
from megatron_longctx.config.schema import ExperimentConfig, StageConfig
from megatron_longctx.training.batch import to_model_batch
from megatron_longctx.training.callbacks import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    FaultInjector,
    MetricsLogger,
    SignalWatcher,
    WallClockDeadline,
)
from megatron_longctx.training.data import build_stage_loader
from megatron_longctx.training.reporting import log0 as _log0
from megatron_longctx.training.reporting import maybe_evaluate_stage, step_record
from megatron_longctx.training.setup import (
    OptimizerSettings,
    build_optimizer,
    build_scheduler,
    wrap_ddp,
)
from megatron_longctx.training.step import forward_backward

logger = logging.getLogger("megatron_longctx.train")

CPU_NOMINAL_PEAK_FLOPS = 1e11  # MFU on CPU is indicative only


def core_attention_name(stage: StageConfig, backend: str = "auto") -> str | None:
    """The stage's core attention. "auto": Transformer Engine's own THD/CP attention ("te", with
    ``pad_between_seqs``, model/attention/gpu.py) when the TE backend is in use (GPU, untested
    here), else the project's document-masked attention ("local" for CP 1, "ring" for CP > 1)."""
    from megatron_longctx.model.specs import resolve_backend

    if stage.core_attention != "auto":
        return stage.core_attention
    if resolve_backend(backend) == "te":
        return "te"
    return "local" if stage.parallel.context_parallel_size == 1 else "ring"


def core_attention_for(stage: StageConfig, training) -> type | None:
    """The stage's core-attention class with the configured block kernel (None: the backend's)."""
    from megatron_longctx.model.attention import core_attention_class

    name = core_attention_name(stage, training.backend)
    return None if name is None else core_attention_class(name, training.attention_kernel)


def _start_point(cfg: ExperimentConfig, save_dir: str) -> tuple[int, Path | None, Path | None, int]:
    """(first stage to run, checkpoint to resume inside it, checkpoint to transition from, iter)."""
    latest = find_latest(save_dir)
    if latest is None:
        return 0, None, None, 0
    ckpt = iteration_dir(save_dir, latest)
    state = read_state(ckpt)["state"]
    names = [s.name for s in cfg.stages]
    if state.get("stage_name") not in names:
        raise ConfigError(
            f"checkpoint {ckpt} is from stage {state.get('stage_name')!r}, which this "
            f"config does not have (stages: {names}); use another checkpoint.save_dir"
        )
    idx = names.index(state["stage_name"])
    if state["stage_step"] >= cfg.stages[idx].num_steps:
        return idx + 1, None, ckpt, state["iteration"]
    return idx, ckpt, None, state["iteration"]


def train(cfg: ExperimentConfig, resolved: dict, *, config_dir: str | Path | None = None) -> int:
    """Runs (or resumes) the whole curriculum. Returns the process exit code."""
    from megatron_longctx.runtime.distributed import init_process_group

    device = init_process_group(
        device=cfg.training.device, timeout_s=60 * cfg.training.dist_timeout_minutes
    )
    save_dir = expand_env(cfg.checkpoint.save_dir)
    first, resume, transition, iteration = _start_point(cfg, save_dir)
    metrics = MetricsLogger(
        expand_env(cfg.logging.run_dir),
        cfg.logging.interval,
        resolved,
        wandb_project=cfg.logging.wandb_project,
        wandb_mode=cfg.logging.wandb_mode,
        resume_iteration=iteration,
    )
    if first == len(cfg.stages) and dist.get_rank() == 0:
        print(f"all {len(cfg.stages)} stages are complete in {save_dir}; nothing to do", flush=True)
    signals = SignalWatcher(deadline=WallClockDeadline.from_env(), device=device)
    faults = FaultInjector()
    rc = 0
    for idx in range(first, len(cfg.stages)):
        rc, iteration = _run_stage(
            cfg,
            resolved,
            idx,
            resume=resume,
            transition=transition,
            iteration=iteration,
            save_dir=save_dir,
            metrics=metrics,
            signals=signals,
            faults=faults,
            config_dir=config_dir,
            device=device,
        )
        if rc:
            break
        resume, transition = None, iteration_dir(save_dir, iteration)
    metrics.plot()
    metrics.finish()
    return rc


def _run_stage(
    cfg,
    resolved,
    idx,
    *,
    resume,
    transition,
    iteration,
    save_dir,
    metrics,
    signals,
    faults,
    config_dir,
    device,
) -> tuple[int, int]:
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    stage = cfg.stages[idx]
    model_cfg = cfg.model_config(stage)
    layout = stage.parallel
    world = dist.get_world_size()
    # 1. groups
    dp = stage.validate_layout(model_cfg, world)
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed + idx)
    torch.manual_seed(cfg.seed + idx)
    # 2. model and optimizer
    use_dist_opt = cfg.optimizer.use_distributed_optimizer
    if use_dist_opt and not torch.cuda.is_available():
        raise ConfigError(
            "optimizer.use_distributed_optimizer=true needs GPUs: megatron's "
            "DistributedOptimizer checkpoints fail with its CPU torch-AdamW fallback; "
            "set optimizer.use_distributed_optimizer=false for CPU runs"
        )
    model = build_gpt_model(
        model_cfg,
        layout,
        backend=cfg.training.backend,
        core_attention=core_attention_for(stage, cfg.training),
        recompute=stage.recompute,
        seq_length=stage.seq_length,
        params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
    )
    model.config.variable_seq_lengths = layout.pipeline_model_parallel_size > 1  # THD lengths vary
    chunks = wrap_ddp([model], use_distributed_optimizer=use_dist_opt)
    opt_cfg = cfg.optimizer
    settings = OptimizerSettings(
        lr=stage.lr,
        min_lr=stage.lr * stage.min_lr_ratio,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
    )
    optimizer = build_optimizer(
        chunks, settings, bf16=cfg.training.bf16, use_distributed_optimizer=use_dist_opt
    )
    total = stage.num_steps

    def new_scheduler():
        return build_scheduler(
            optimizer,
            settings,
            total_steps=total,
            warmup_ratio=stage.warmup_ratio,
            decay_style=stage.lr_decay_style,
        )

    # 3. state
    stage_step, consumed = 0, 0
    if resume is not None:
        scheduler = new_scheduler()
        state = load_checkpoint(
            resume, chunks, optimizer, scheduler, expect_model=model_cfg.to_dict()
        )
        stage_step = state["stage_step"]
        _log0(f"resumed stage {stage.name!r} at step {stage_step} from {resume}")
    elif transition is not None:
        load_checkpoint(transition, chunks, optimizer, None, expect_model=model_cfg.to_dict())
        for group in optimizer.param_groups:  # the loaded groups carry the previous stage's LRs
            group["max_lr"], group["min_lr"] = settings.lr, settings.min_lr
        scheduler = new_scheduler()  # after loading: the LR schedule restarts with warmup
        _log0(
            f"stage {stage.name!r}: weights and Adam moments from {transition}; LR restarts; "
            f"RoPE theta {model_cfg.rope_theta:g}, scaling {model_cfg.rope_scaling}"
        )
    else:
        if stage.init_from:
            load_checkpoint(
                expand_env(stage.init_from), chunks, None, None, expect_model=model_cfg.to_dict()
            )
            _log0(f"stage {stage.name!r}: initialised from {stage.init_from}")
        scheduler = new_scheduler()
    # 4. data (Transformer Engine's attention only knows per-document zigzag units)
    te = core_attention_name(stage, cfg.training.backend) in (None, "te")
    sharding = "document" if te else stage.cp_sharding
    loader = build_stage_loader(
        cfg,
        stage,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        consumed_samples=consumed,
        base_dir=config_dir,
        cp_sharding=sharding,
    )
    if resume is not None:  # restores consumed samples; refuses a changed mixture or index
        loader.load_state_dict(
            state.get("loader") or {"consumed_samples": state["consumed_samples"]}
        )
    cp = layout.context_parallel_size
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_group = parallel_state.get_context_parallel_group()

    def save(protected=False):
        state = {
            "stage_index": idx,
            "stage_name": stage.name,
            "stage_step": stage_step,
            "stage_steps": total,
            "consumed_samples": loader.consumed_samples,
            "loader": loader.state_dict(),
            "iteration": iteration,
            "model": model_cfg.to_dict(),
            "config": resolved,
        }
        save_checkpoint(
            save_dir,
            iteration,
            chunks,
            optimizer,
            scheduler,
            state=state,
            keep_last=cfg.checkpoint.keep_last,
            protected=protected,
            before_marker=faults.in_save,
        )

    # 5. steps
    peak = cfg.training.peak_flops_per_device or (
        989e12 if torch.cuda.is_available() else CPU_NOMINAL_PEAK_FLOPS
    )
    metrics.reset_timer()
    while stage_step < total:
        faults.before_step(iteration + 1, chunks)
        micro = [
            to_model_batch(
                next(loader),
                cp,
                cp_rank,
                cp_group,
                sharding,
                device=device,
                tp_size=layout.tensor_model_parallel_size,
                sequence_parallel=layout.sequence_parallel,
            )
            for _ in range(loader.num_micro_batches)
        ]
        result = forward_backward(
            chunks,
            micro,
            seq_length=stage.seq_length,
            micro_batch_size=stage.micro_batch_size,
            optimizer=optimizer,
        )
        skipped, grad_norm = False, float("nan")
        if not math.isfinite(result.loss):
            if cfg.training.nan_policy == "halt":
                _log0(
                    f"non-finite loss {result.loss} at iteration {iteration + 1}: halting "
                    "without a checkpoint (set training.nan_policy=skip to skip such steps)"
                )
                return EXIT_NONFINITE, iteration
            skipped = True
        else:
            _, grad_norm, _ = optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                _log0(f"non-finite grad norm at iteration {iteration + 1}: halting, no checkpoint")
                return EXIT_NONFINITE, iteration
        scheduler.step(1)
        stage_step += 1
        iteration += 1
        metrics.log(
            loader.step_balance()  # max/mean work across CP and DP ranks, padding share
            | step_record(
                stage,
                stage_step,
                total,
                iteration,
                result,
                optimizer,
                grad_norm,
                skipped,
                micro,
                model_cfg,
                peak,
                world,
                metrics,
            )
        )
        faults.after_step(iteration)
        every = stage.checkpoint_interval or cfg.checkpoint.interval
        interval_due = stage_step % max(1, every) == 0
        if stage_step == total:
            save(protected=True)
            if stage.eval:
                maybe_evaluate_stage(
                    cfg, stage, iteration_dir(save_dir, iteration), metrics, iteration
                )
        elif interval_due:
            save()
        if signals.agreed():
            if not (interval_due or stage_step == total):
                save()
            _log0(
                f"{signals.reason}: checkpoint at iteration {iteration} saved; exiting with "
                f"{EXIT_PREEMPTED} so the launcher requeues the job"
            )
            return EXIT_PREEMPTED, iteration
    return 0, iteration
