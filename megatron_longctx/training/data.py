"""A stage's data: mixture spec -> cached sample index -> this DP rank's resumable loader."""

from __future__ import annotations

from pathlib import Path

from megatron_longctx.config.schema import ExperimentConfig, StageConfig
from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.data.mixture import MixtureSpec, load_mixture_yaml, mixture_from_dict
from megatron_longctx.parallel.dp_assign import WorkModel
from megatron_longctx.perf.flops import linear_pairs_per_token


def stage_mixture(stage: StageConfig, base_dir: str | Path | None = None) -> MixtureSpec:
    """The stage's mixture: an inline mapping or a YAML path (relative to the recipe's folder)."""
    if stage.mixture is None:
        raise ValueError(
            f"stage {stage.name!r} has no mixture: set stages.N.mixture to a mixture "
            "YAML (see examples/mixtures/) or an inline mapping with components:"
        )
    if isinstance(stage.mixture, dict):
        return mixture_from_dict(stage.mixture)
    path = Path(stage.mixture)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = Path(base_dir) / path
    return load_mixture_yaml(path)


def build_stage_loader(
    cfg: ExperimentConfig,
    stage: StageConfig,
    *,
    dp_rank: int,
    dp_size: int,
    base_dir: str | Path | None = None,
    cp_sharding: str | None = None,
) -> MixtureLoader:
    """Builds (or loads from cache) the stage's index and this DP rank's loader at its start
    (``MixtureLoader.load_state_dict`` moves it to a resumed position).

    ``cp_sharding`` (default the stage's) is the sharding the work model assumes for the balanced
    DP assignment and the balance telemetry."""
    spec = stage_mixture(stage, base_dir)
    index = build_mixture_index(
        spec,
        stage.seq_length,
        stage.num_steps * stage.samples_per_step,
        vocab_size=cfg.data.vocab_size or cfg.model_config().vocab_size,
        cp_size=stage.parallel.context_parallel_size,
        cache_dir=cfg.data.cache_dir,
    )
    return MixtureLoader(
        index,
        global_batch_size=stage.samples_per_step,
        micro_batch_size=stage.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        work=WorkModel(
            stage.parallel.context_parallel_size,
            cp_sharding or stage.cp_sharding,
            linear_pairs_per_token(cfg.model_config(stage)),
        ),
        balance=stage.dp_balance,
        # megatron's interleaved schedule runs micro-batches in groups of PP
        min_micro_batches=(
            stage.parallel.pipeline_model_parallel_size
            if stage.parallel.virtual_pipeline_model_parallel_size
            else 1
        ),
    )
