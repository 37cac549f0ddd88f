"""The parallel layout (TP x PP x CP x DP) and every size rule, checked once before a model is built.

Each error names the rule and shows the arithmetic, e.g.
"world size 6 is not TP 2 x PP 1 x CP 2 x DP: 6 is not divisible by 4".

The rules other modules need on their own are module-level functions, and those modules call them
instead of restating them: ``check_sequence_length`` (the mixture index), ``check_heads`` (the
model config, all-to-all CP), ``samples_per_step`` (the recipe's and the planner's token batch),
``num_micro_batches`` (the loader, the DP assignment). ``error=`` keeps a caller's exception type.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the rule and the numbers."""


def token_multiple(
    context_parallel_size: int, tensor_model_parallel_size: int = 1, sequence_parallel: bool = False
) -> int:
    """What a packed (THD) sequence's padded length must be a multiple of: 2 x CP (zigzag chunks),
    x TP with sequence parallelism (megatron scatters each CP rank's ``t / CP`` tokens over TP).

    The batch path pads to it (training.batch) and validation checks recipes against it, so the
    planner (which validates every candidate) and the trainer agree.
    """
    tp = tensor_model_parallel_size if sequence_parallel else 1
    return 2 * context_parallel_size * tp


def check_sequence_length(
    seq_length: int,
    context_parallel_size: int = 1,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    *,
    error: type[ValueError] = LayoutError,
) -> None:
    """The sequence-length rule: S is a positive multiple of ``token_multiple``.

    ``error`` is the caller's exception type (the data path raises MixtureError).
    """
    cp = context_parallel_size
    if not isinstance(cp, int) or cp < 1:
        raise error(f"context_parallel_size must be a positive integer, got {cp!r}")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise error(f"seq_length must be a positive integer, got {seq_length!r}")
    multiple = token_multiple(cp, tensor_model_parallel_size, sequence_parallel)
    if seq_length % multiple:
        rule = "2 x CP" + (" x TP (sequence parallel)" if sequence_parallel else "")
        raise error(
            f"sequence length {seq_length} is not divisible by {rule} = {multiple} (zigzag CP "
            f"cuts each sequence into 2 x CP chunks): {seq_length} % {multiple} = "
            f"{seq_length % multiple}; pick a multiple such as "
            f"{(seq_length // multiple + 1) * multiple}"
        )


def check_heads(
    num_attention_heads: int, num_query_groups: int, *, error: type[ValueError] = LayoutError
) -> None:
    """The grouped-query rule: every query group (KV head) serves the same number of heads."""
    if num_attention_heads % num_query_groups:
        raise error(
            f"attention heads {num_attention_heads} are not divisible by query groups "
            f"{num_query_groups} (KV heads): {num_attention_heads} % {num_query_groups} = "
            f"{num_attention_heads % num_query_groups}"
        )


def samples_per_step(
    global_batch_tokens: int, seq_length: int, *, error: type[ValueError] = LayoutError
) -> int:
    """The global batch in samples when it is given in tokens (a whole number of sequences)."""
    if global_batch_tokens % seq_length:
        lower = global_batch_tokens // seq_length * seq_length
        raise error(
            f"global_batch_tokens {global_batch_tokens} is not a multiple of seq_length "
            f"{seq_length}: {global_batch_tokens} % {seq_length} = "
            f"{global_batch_tokens % seq_length}; use "
            + (f"{lower} or " if lower else "")
            + f"{lower + seq_length} tokens"
        )
    return global_batch_tokens // seq_length


def num_micro_batches(
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    *,
    error: type[ValueError] = LayoutError,
) -> int:
    """The global-batch rule: global = micro batch x DP x micro-batches per step (per DP rank).

    Returns:
        The micro-batches per step of each DP rank.
    """
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        why = (
            f"its {global_batch_size // micro_batch_size} micro-batches are not divisible by "
            f"DP {dp_size}"
            if global_batch_size % micro_batch_size == 0
            else f"it is not a multiple of micro batch {micro_batch_size}"
        )
        raise error(
            f"global batch {global_batch_size} is not divisible by micro batch "
            f"{micro_batch_size} x DP {dp_size} = {step} (global batch = micro batch x DP x "
            f"micro-batches): {global_batch_size} is not divisible by {step}, {why}; use a "
            f"multiple of {step}"
        )
    return global_batch_size // step


@dataclass
class ParallelLayout:
    """How the job's GPUs (or CPU processes) are split. GPUs = TP x PP x CP x DP.

    Attributes:
        tensor_model_parallel_size: TP, splits attention heads and the FFN inside each layer.
        pipeline_model_parallel_size: PP, splits the layers into consecutive stages.
        context_parallel_size: CP, splits the sequence (zigzag chunks) across ranks.
        data_parallel_size: DP; None means "whatever the world size leaves".
        virtual_pipeline_model_parallel_size: interleaved pipeline chunks per stage (None = off).
        sequence_parallel: shard layer-norm/dropout activations over TP (TE, or model/norm.py's
            torch norm with the local spec).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    data_parallel_size: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if self.data_parallel_size is not None and self.data_parallel_size < 1:
            raise LayoutError(
                f"data_parallel_size must be >= 1 or None, got {self.data_parallel_size}"
            )

    @property
    def token_multiple(self) -> int:
        """See the module-level ``token_multiple``."""
        return token_multiple(
            self.context_parallel_size, self.tensor_model_parallel_size, self.sequence_parallel
        )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def describe(self, dp: int | None = None) -> str:
        return (
            f"TP {self.tensor_model_parallel_size} x PP {self.pipeline_model_parallel_size} x "
            f"CP {self.context_parallel_size} x DP" + ("" if dp is None else f" {dp}")
        )

    def validate_world_size(self, world_size: int) -> int:
        """Returns DP after checking TP x PP x CP x DP == world size."""
        mp = self.model_parallel_size
        if world_size % mp != 0:
            raise LayoutError(
                f"world size {world_size} is not {self.describe()}: "
                f"{world_size} is not divisible by {mp}"
            )
        dp = world_size // mp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise LayoutError(
                f"world size {world_size} != {self.describe(self.data_parallel_size)} = "
                f"{mp * self.data_parallel_size}"
            )
        return dp

    def validate(
        self,
        *,
        world_size: int,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        seq_length: int | None = None,
        micro_batch_size: int | None = None,
        global_batch_size: int | None = None,
    ) -> int:
        """Checks every size rule; returns the data-parallel size.

        Args:
            world_size: number of processes (GPUs).
            num_layers / num_attention_heads / num_query_groups: the model's sizes.
            seq_length: tokens per sample (divisible by 2 x CP, x TP with sequence parallel).
            micro_batch_size / global_batch_size: samples; global = micro x DP x num_micro_batches.
        """
        tp, pp, cp = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.context_parallel_size,
        )
        dp = self.validate_world_size(world_size)
        if num_attention_heads % tp:
            raise LayoutError(f"attention heads {num_attention_heads} are not divisible by TP {tp}")
        if num_query_groups % tp:
            raise LayoutError(
                f"query groups (KV heads) {num_query_groups} are not divisible by TP {tp}"
            )
        check_heads(num_attention_heads, num_query_groups)
        if num_layers % pp:
            raise LayoutError(f"layers {num_layers} are not divisible by PP {pp}")
        if self.virtual_pipeline_model_parallel_size:
            vpp = self.virtual_pipeline_model_parallel_size
            if pp < 2:
                raise LayoutError(f"virtual pipeline size {vpp} needs PP >= 2, got PP {pp}")
            if num_layers % (pp * vpp):
                raise LayoutError(
                    f"layers {num_layers} are not divisible by PP {pp} x "
                    f"virtual pipeline {vpp} = {pp * vpp}"
                )
        if self.sequence_parallel and tp == 1:
            raise LayoutError(
                "sequence_parallel needs TP > 1 (it shards activations over TP), got TP 1"
            )
        if seq_length is not None:
            check_sequence_length(seq_length, cp, tp, self.sequence_parallel)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise LayoutError(f"micro batch size must be >= 1, got {micro_batch_size}")
        if global_batch_size is not None and micro_batch_size is not None:
            num_micro_batches(global_batch_size, micro_batch_size, dp)
        return dp

    def num_micro_batches(self, global_batch_size: int, micro_batch_size: int, dp: int) -> int:
        """See the module-level ``num_micro_batches``."""
        return num_micro_batches(global_batch_size, micro_batch_size, dp)
