"""Entry point: ``python -m megatron_longctx.train --config RECIPE.yaml [a.b=value ...] [--dry-run]``.

Launch with torchrun (``torchrun --nproc-per-node 8 -m megatron_longctx.train --config ...``) or
srun (one task per GPU; launch/*.sh). Re-running the same command resumes from the newest complete
checkpoint in ``checkpoint.save_dir``. ``--dry-run`` prints the resolved config (all stages) and the
validated parallel layout of each stage, then exits without starting torch.distributed.
Exit codes: see megatron_longctx/training/signals.py (75 = preempted, checkpoint saved, requeue).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from megatron_longctx.config.loading import ConfigError, to_dict
from megatron_longctx.config.schema import ExperimentConfig
from megatron_longctx.parallel.layout import LayoutError


def dry_run(cfg: ExperimentConfig, world_size: int, config_dir: Path | None = None) -> str:
    """The resolved config and each stage's validated layout and mixture, as text."""
    from megatron_longctx.training.data import stage_mixture

    lines = [yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "", "# parallel layouts"]
    for stage in cfg.stages:
        if stage.mixture is not None:
            spec = stage_mixture(stage, config_dir)  # parses and validates weights/buckets
            lines.append(
                f"stage {stage.name} mixture: "
                + ", ".join(f"{c.name} {c.weight:g}" for c in spec.components)
            )
        m = cfg.model_config(stage)
        dp = stage.validate_layout(m, world_size)
        lines.append(
            f"stage {stage.name}: world {world_size} = {stage.parallel.describe(dp)}; "
            f"S={stage.seq_length}, {stage.samples_per_step} samples/step "
            f"({stage.samples_per_step * stage.seq_length} tokens), {stage.num_steps} steps, "
            f"micro-batches/rank {stage.samples_per_step // (stage.micro_batch_size * dp)}, "
            f"rope_theta {m.rope_theta:g}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="long-context curriculum trainer")
    p.add_argument("--config", required=True, help="recipe YAML (see examples/)")
    p.add_argument("--dry-run", action="store_true", help="print resolved config + layouts, exit")
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --dry-run: the world size to validate against (default: from env)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party warnings and log lines too (= LONGCTX_LOG_LEVEL=debug; "
        "the filter list is megatron_longctx/logs.py)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.lr=2e-5")
    args = p.parse_args(argv)
    if args.verbose:
        from megatron_longctx.logs import ENV, apply_filters

        os.environ[ENV] = "debug"  # for the processes this one starts (data workers, eval)
        apply_filters(verbose=True)
    try:
        cfg = ExperimentConfig.load(args.config, args.overrides)
        world = args.world_size or int(
            os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1
        )
        text = dry_run(cfg, world, Path(args.config).resolve().parent)
        if not args.dry_run:  # a placeholder path is fine for printing, not for training
            from megatron_longctx.checkpoint.init_from import check_init_from

            check_init_from(cfg.stages, cfg.checkpoint.save_dir)
    except (ConfigError, LayoutError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text)
        return 0
    from megatron_longctx.checkpoint.dist import CheckpointError
    from megatron_longctx.data.mixture import MixtureError
    from megatron_longctx.eval.stage_end import StageEndEvaluation
    from megatron_longctx.training.loop import train

    config_dir = Path(args.config).resolve().parent
    try:  # the stage-end evaluation is this entry point's callback: training/ never imports eval/
        return train(cfg, to_dict(cfg), config_dir=config_dir, callbacks=[StageEndEvaluation()])
    except (CheckpointError, MixtureError, LayoutError, ConfigError) as err:
        # Bad input found before (or instead of) a step: one clear line, no traceback; nothing
        # already written is touched.
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # a peer gone (killed, node down, network cut): exit 76, requeue
        from megatron_longctx.training.signals import exit_on_peer_failure

        exit_on_peer_failure(err)  # returns for any other error
        raise


if __name__ == "__main__":
    sys.exit(main())
