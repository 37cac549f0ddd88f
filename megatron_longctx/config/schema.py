"""The experiment config tree: one recipe holds the model, the optimizer and every curriculum stage.

Recipes live in examples/*.yaml; ``python -m megatron_longctx.train --config R.yaml a.b=v --dry-run``
prints the resolved tree. Paths may use ``${ENV_VAR}`` (``${VAR:-default}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from megatron_longctx.config.loading import (
    ConfigError,
    apply_overrides,
    check_keys,
    expand_env,
    from_dict,
    load_yaml,
)
from megatron_longctx.model.config import ModelConfig, get_preset
from megatron_longctx.model.rope import validate_rope_scaling
from megatron_longctx.parallel.layout import LayoutError, ParallelLayout, samples_per_step

STAGE_TYPES = ("pretrain", "sft")
NAN_POLICIES = ("halt", "skip")


@dataclass
class StageConfig:
    """One curriculum stage.

    Attributes:
        name: used in logs, checkpoints and wandb.
        seq_length: tokens per packed sample S (must be divisible by 2 x CP).
        mixture: path to a mixture YAML (examples/mixtures/) or an inline mixture mapping.
        lr: peak learning rate; the schedule restarts at every stage (warmup again).
        steps / tokens: stage length, in optimizer steps or training tokens (exactly one).
        global_batch_tokens / global_batch_size: batch per step in tokens or samples (exactly one).
        micro_batch_size: samples per forward pass per rank.
        min_lr_ratio: cosine floor as a fraction of lr (ProLong: 0.1).
        warmup_ratio: warmup as a fraction of the stage's steps (ProLong: 0.1).
        lr_decay_style: megatron scheduler style (cosine, linear, constant).
        rope_theta: RoPE base for this stage (None keeps the model's). ProLong: 8e6 then 1.28e8.
        rope_scaling: transformers-style scaling dict for this stage, e.g. {rope_type: linear,
            factor: 4}; None for plain RoPE (ABF only changes theta).
        parallel: TP / PP / CP (DP is what the world size leaves); may change between stages.
        recompute: activation recompute: None, "selective" or "full".
        init_from: the weights of the first stage: the converter's --save folder
            (tools/convert_checkpoint.py hf-to-mcore; its newest complete checkpoint) or one
            iter_* folder (checkpoint/init_from.py); later stages continue from the previous. A
            model section of another shape is refused at config load.
        type: "pretrain" or "sft" (instruction data; loss on assistant tokens only).
        core_attention: "auto" (project's document-masked attention), "ring", "a2a", "te".
        cp_sharding: how documents are cut into zigzag chunks across CP ranks
            (parallel/units.py): "balanced" (default: per-document zigzag with chunk sizes
            differing by at most a token, no padding, leftovers dealt round-robin so every rank
            holds the same work), "document" (per-document zigzag padded to 2 x CP; forced with
            Transformer Engine's attention, the only THD layout it accepts) or "sequence"
            (megatron's whole-sequence zigzag).
        dp_balance: deal each global batch's samples to DP ranks and micro-batches by their
            work (parallel/dp_assign.py; ranks may run different numbers of micro-batches);
            the set of samples per step, hence the loss, is unchanged.
        eval: run the long-context evaluation at the end of the stage: in-process on every rank
            with the stage's layout at its sequence length, teacher forced (every backend,
            eval/stage_end.py), then the HF route (rank 0 exports the final checkpoint and runs
            megatron_longctx.eval; not inside multi-GPU NCCL jobs).
        eval_settings: overrides of megatron_longctx.eval.EvalSettings (context_lengths, depths,
            num_samples, tasks, loss_data, ...; the HF route); lengths beyond seq_length are
            skipped. Its ``in_process`` block overrides eval.teacher_forced's
            TeacherForcedSettings (tasks needle / niah_multikey / json_kv / loss, lengths,
            the cost bounds max_forward_tokens / max_seconds).
        loss_chunk_tokens: the output layer + cross entropy run chunk by chunk of this many tokens
            per rank and micro-batch, never holding more than one chunk's logits (model/loss.py;
            ProLong's LOGIT_BLOCK_SIZE); 0: megatron's unchunked output layer and loss (writes the
            [tokens, vocab / TP] logits and keeps their fp32 softmax: 47 GiB at 64K tokens with
            Llama 3's vocabulary). null (default): 2048 when seq_length > 8192, else 0
            (model.config.resolve_loss_chunk_tokens; tools/plan.py applies the same rule).
        checkpoint_interval: save every N steps of this stage (None: checkpoint.interval). Step
            times differ ~10x between 64K and 512K stages; tools/plan.py prints the interval that
            saves about every 30 minutes at its estimated step time.
    """

    name: str
    seq_length: int
    mixture: str | dict | None = None
    lr: float = 1e-5
    steps: int | None = None
    tokens: int | None = None
    global_batch_tokens: int | None = None
    global_batch_size: int | None = None
    micro_batch_size: int = 1
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.1
    lr_decay_style: str = "cosine"
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    recompute: str | None = None
    init_from: str | None = None
    type: str = "pretrain"
    core_attention: str = "auto"
    cp_sharding: str = "balanced"
    dp_balance: bool = True
    eval: bool = False
    eval_settings: dict | None = None
    loss_chunk_tokens: int | None = None
    checkpoint_interval: int | None = None

    def __post_init__(self):
        where = f"stage {self.name!r}"
        if self.checkpoint_interval is not None and self.checkpoint_interval < 1:
            raise ConfigError(
                f"{where}: checkpoint_interval must be >= 1 (or null for checkpoint.interval), "
                f"got {self.checkpoint_interval}"
            )
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise ConfigError(
                f"{where}: loss_chunk_tokens must be >= 0 (0: megatron's unchunked loss) or null "
                f"(auto), got {self.loss_chunk_tokens}"
            )
        if (self.steps is None) == (self.tokens is None):
            raise ConfigError(f"{where}: give exactly one of steps or tokens")
        if (self.global_batch_tokens is None) == (self.global_batch_size is None):
            raise ConfigError(
                f"{where}: give exactly one of global_batch_tokens or global_batch_size"
            )
        if self.global_batch_tokens is not None:
            try:
                samples_per_step(self.global_batch_tokens, self.seq_length)
            except LayoutError as err:
                raise ConfigError(f"{where}: {err}") from None
        if self.type not in STAGE_TYPES:
            raise ConfigError(f"{where}: type must be one of {STAGE_TYPES}, got {self.type!r}")
        if self.recompute not in (None, "selective", "full"):
            raise ConfigError(f"{where}: recompute must be null, selective or full")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{where}: warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.lr <= 0:
            raise ConfigError(f"{where}: lr must be > 0, got {self.lr}")
        try:  # the one RoPE translator (model/rope.py) refuses what it cannot train and export
            self.rope_scaling = validate_rope_scaling(self.rope_scaling, f"{where}: rope_scaling")
        except ValueError as err:
            raise ConfigError(str(err)) from err
        from megatron_longctx.parallel.units import SHARDINGS

        if self.cp_sharding not in SHARDINGS:
            hint = " ('adaptive' became 'balanced')" if self.cp_sharding == "adaptive" else ""
            raise ConfigError(
                f"{where}: cp_sharding must be one of {SHARDINGS}, got {self.cp_sharding!r}{hint}"
            )
        if self.core_attention == "te" and self.cp_sharding != "document":
            raise ConfigError(
                f"{where}: core_attention 'te' needs cp_sharding 'document' (Transformer Engine's "
                f"THD attention only knows one document per cu_seqlens entry), got "
                f"{self.cp_sharding!r}; set stages.N.cp_sharding=document"
            )

    def validate_layout(self, model: ModelConfig, world_size: int) -> int:
        """Checks every size rule of this stage's layout for ``model``; returns the DP size."""
        return self.parallel.validate(
            world_size=world_size,
            num_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.samples_per_step,
        )

    @property
    def resolved_loss_chunk_tokens(self) -> int | None:
        """Tokens per loss chunk for this stage (None: megatron's unchunked loss)."""
        from megatron_longctx.model.config import resolve_loss_chunk_tokens

        return resolve_loss_chunk_tokens(self.loss_chunk_tokens, self.seq_length)

    @property
    def samples_per_step(self) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size
        return samples_per_step(self.global_batch_tokens, self.seq_length)

    @property
    def num_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, -(-self.tokens // (self.samples_per_step * self.seq_length)))


@dataclass
class OptimizerSettings:
    """AdamW with ProLong's defaults: the recipe's ``optimizer:`` section, and what
    ``training/setup.py`` builds megatron's optimizer and LR schedule from (the one type).

    Attributes:
        weight_decay / adam_beta1 / adam_beta2 / adam_eps: AdamW hyper-parameters.
        clip_grad: global gradient-norm clip (0 disables).
        use_distributed_optimizer: shard Adam state over DP (megatron's DistributedOptimizer;
            GPU recipes; its checkpoints fail on megatron's CPU torch-AdamW fallback, so CPU runs
            refuse it).
        lr / min_lr: peak LR and the schedule's floor. Per stage, so not recipe keys:
            ``for_stage`` fills them from ``stages.N.lr`` and ``min_lr_ratio``.
    """

    NOT_IN_RECIPE: ClassVar[dict[str, str]] = {
        "lr": "the learning rate is per stage: set stages.N.lr",
        "min_lr": "the LR floor is per stage: set stages.N.min_lr_ratio",
    }

    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    lr: float = 1e-5
    min_lr: float = 1e-6

    def for_stage(self, stage: StageConfig) -> OptimizerSettings:
        """These settings with ``stage``'s peak LR and floor."""
        return replace(self, lr=stage.lr, min_lr=stage.lr * stage.min_lr_ratio)


@dataclass
class DataSection:
    """Data settings shared by the stages.

    Attributes:
        cache_dir: where mixture indices are cached (keyed by a hash of inputs + config).
        vocab_size: the tokenizer's vocabulary; checked against the datasets' token dtype.
        tokenizer_type / tokenizer_model: the tokenizer (for SFT chat data and evaluation).
    """

    cache_dir: str = "runs/cache"
    vocab_size: int | None = None
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None


@dataclass
class CheckpointSection:
    """Attributes:
    save_dir: checkpoints of this run (resume reads the newest complete one here).
    interval: save every N steps (and always at the end of each stage).
    keep_last: keep the last K complete checkpoints (stage-final ones are kept too).
    """

    save_dir: str = "runs/default/checkpoints"
    interval: int = 50
    keep_last: int = 2


@dataclass
class LoggingSection:
    """Attributes:
    run_dir: logs, metrics.jsonl, loss-curve PNG, wandb files.
    interval: log a line every N steps.
    wandb_project: wandb project; wandb_mode: auto (online with WANDB_API_KEY, else offline),
        online, offline or disabled.
    """

    run_dir: str = "runs/default"
    interval: int = 1
    wandb_project: str = "megatron-longctx"
    wandb_mode: str = "auto"


@dataclass
class TrainingSection:
    """Attributes:
    device: auto, cpu or cuda. backend: model layers, auto | local | te.
    nan_policy: halt (default; nothing is checkpointed after a NaN/inf) or skip the step.
    peak_flops_per_device: for the MFU estimate (None: H100 bf16 dense on GPU, nominal on CPU).
    bf16: bf16 parameters and activations with fp32 main weights in the optimizer (GPU recipes;
        Megatron-LM's --bf16: megatron's Float16OptimizerWithFloat16Params, or the
        DistributedOptimizer, keeps the fp32 copy).
    fp16: the same in fp16, with megatron's dynamic loss scaling (Megatron-LM's --fp16).
    attention_kernel: block kernel under the project's local / ring / a2a attention: auto (CPU:
        torch's CPU flash kernel; CUDA: flash-attn if installed, else torch's flash varlen; CUDA
        fp32: tiled), cpu_flash, torch_flash, flash_attn, tiled (model/attention/kernels.py).
        Ignored by 'te'.
    dist_timeout_minutes: timeout of every process group, the world group and megatron's
        (NCCL and gloo) alike (Megatron-LM's --distributed-timeout-minutes): how long a rank waits
        in a collective (e.g. for rank 0 saving or building an index cache) before failing.
    hang_timeout_factor / hang_timeout_min_s / hang_timeout_max_s: the hang watchdog
        (training/watchdog.py): a rank that makes no progress for factor x the slowest recent
        step, clamped to [min_s, max_s] (max_s also for a stage's first step, saves and a
        stage-end evaluation in training: raise it if those take longer), writes
        its stacks to <run_dir>/hang/ and exits 76 (the launcher requeues). factor 0: off.
    """

    device: str = "auto"
    backend: str = "auto"
    nan_policy: str = "halt"
    peak_flops_per_device: float | None = None
    bf16: bool = False
    fp16: bool = False
    attention_kernel: str = "auto"
    dist_timeout_minutes: float = 30.0
    hang_timeout_factor: float = 5.0
    hang_timeout_min_s: float = 120.0
    hang_timeout_max_s: float = 900.0

    def __post_init__(self):
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"training.nan_policy must be one of {NAN_POLICIES}")
        if self.bf16 and self.fp16:
            raise ConfigError("training.bf16 and training.fp16 are both true: choose one")
        from megatron_longctx.model.attention.kernels import KERNELS  # the one kernel registry

        if self.attention_kernel not in KERNELS:
            raise ConfigError(
                f"training.attention_kernel must be one of {KERNELS}, got {self.attention_kernel!r}"
            )
        if self.dist_timeout_minutes <= 0:
            raise ConfigError(
                f"training.dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes}"
            )
        lo, hi = self.hang_timeout_min_s, self.hang_timeout_max_s
        if self.hang_timeout_factor < 0 or not 0 < lo <= hi:
            raise ConfigError(
                "training.hang_timeout_*: need factor >= 0 (0: off) and 0 < min_s <= max_s, got "
                f"factor {self.hang_timeout_factor}, min_s {self.hang_timeout_min_s}, max_s "
                f"{self.hang_timeout_max_s}"
            )

    @property
    def params_dtype(self):
        """The dtype of every model parameter (the optimizer keeps fp32 main copies of bf16/fp16)."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class ExperimentConfig:
    """The whole recipe. ``model`` is a preset name (``preset``) or a converted checkpoint / HF
    directory (``from_checkpoint``: its stored model section), plus any ModelConfig field
    overrides."""

    name: str
    stages: list[StageConfig]
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    seed: int = 1234
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("config has no stages: add at least one under stages:")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        base = self.model_config()  # validates the model section early
        for stage in self.stages:  # and each stage's model (RoPE, trained length)
            self.model_config(stage)
        self._check_init_from(base)

    def _check_init_from(self, model: ModelConfig) -> None:
        """A stage's ``init_from`` of another model shape than the recipe's is refused here,
        naming the fields. A path that does not exist yet (a placeholder in a recipe printed
        with --dry-run) is left to the start of training, which names it."""
        from megatron_longctx.checkpoint.init_from import (
            InitFromError,
            checkpoint_model,
            model_mismatch,
        )

        for stage in self.stages:
            if not stage.init_from or not Path(stage.init_from).exists():
                continue
            try:
                diff = model_mismatch(model.to_dict(), checkpoint_model(stage.init_from))
            except InitFromError as err:
                raise ConfigError(f"stage {stage.name!r}: {err}") from None
            if diff:
                fields = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items())
                raise ConfigError(
                    f"stage {stage.name!r}: init_from {stage.init_from} holds another model "
                    f"(checkpoint vs recipe: {fields}); set model.from_checkpoint to the same "
                    "folder, or fix these model fields"
                )

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
        """A recipe YAML + dotted overrides, ``${VAR}`` / ``${VAR:-default}`` expanded (once)."""
        from megatron_longctx.checkpoint.init_from import env_init_from

        env_init_from()  # the recipes' old LONGCTX_INIT still works (deprecated)
        return from_dict(cls, expand_env(apply_overrides(load_yaml(path), list(overrides))))

    def model_config(self, stage: StageConfig | None = None) -> ModelConfig:
        """The base model, or the model as trained in ``stage`` (its RoPE and trained length).

        ``model.preset`` names a preset, ``model.from_checkpoint`` a converted checkpoint (its
        stored model section) or an HF directory (its config.json); other keys override fields.
        """
        raw = dict(self.model)
        preset = raw.pop("preset", None)
        source = raw.pop("from_checkpoint", None)
        check_keys(
            self.model, {"preset", "from_checkpoint", *ModelConfig.__dataclass_fields__}, "model"
        )
        if preset and source:
            raise ConfigError("model: give preset or from_checkpoint, not both")
        try:
            base = get_preset(preset).to_dict() if preset else {}
            if source:
                from megatron_longctx.checkpoint.init_from import checkpoint_model

                base = checkpoint_model(source)
            cfg = from_dict(ModelConfig, {**base, **raw}, "model")  # typed: "1.28e8" -> float
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err
        if stage is not None:
            try:
                cfg = cfg.with_updates(
                    rope_theta=stage.rope_theta if stage.rope_theta is not None else cfg.rope_theta,
                    rope_scaling=stage.rope_scaling,
                    max_position_embeddings=stage.seq_length,
                )
            except ValueError as err:
                raise ConfigError(f"stage {stage.name!r}: {err}") from err
        return cfg
