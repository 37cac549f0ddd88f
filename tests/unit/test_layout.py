"""Every layout rule raises before a model is built, with the rule and the numbers in the text."""

import pytest

from megatron_longctx.parallel.layout import LayoutError, ParallelLayout

MODEL = dict(num_layers=4, num_attention_heads=8, num_query_groups=4)


def test_valid_layout_returns_dp():
    dp = ParallelLayout(2, 2, 1).validate(
        world_size=8, **MODEL, seq_length=64, micro_batch_size=1, global_batch_size=4
    )
    assert dp == 2


@pytest.mark.parametrize(
    "layout,kwargs,message",
    [
        (
            ParallelLayout(2, 1, 2),
            dict(world_size=6),
            "world size 6 is not TP 2 x PP 1 x CP 2 x DP: 6 is not divisible by 4",
        ),
        (
            ParallelLayout(1, 1, 1, data_parallel_size=3),
            dict(world_size=4),
            "world size 4 != TP 1 x PP 1 x CP 1 x DP 3 = 3",
        ),
        (
            ParallelLayout(3, 1, 1),
            dict(world_size=3),
            "attention heads 8 are not divisible by TP 3",
        ),
        (
            ParallelLayout(8, 1, 1),
            dict(world_size=8),
            "query groups (KV heads) 4 are not divisible by TP 8",
        ),
        (ParallelLayout(1, 3, 1), dict(world_size=3), "layers 4 are not divisible by PP 3"),
        (
            ParallelLayout(1, 1, 4),
            dict(world_size=4, seq_length=100),
            "sequence length 100 is not divisible by 2 x CP = 8",
        ),
        (
            ParallelLayout(2, 1, 2, sequence_parallel=True),
            dict(world_size=4, seq_length=12),
            "sequence length 12 is not divisible by 2 x CP x TP (sequence parallel) = 8",
        ),
        (
            ParallelLayout(1, 1, 1),
            dict(world_size=2, micro_batch_size=2, global_batch_size=6),
            "global batch 6 is not divisible by micro batch 2 x DP 2 = 4",
        ),
        (
            ParallelLayout(1, 2, 1, virtual_pipeline_model_parallel_size=4),
            dict(world_size=2),
            "layers 4 are not divisible by PP 2 x virtual pipeline 4 = 8",
        ),
        (
            ParallelLayout(1, 1, 1, sequence_parallel=True),
            dict(world_size=1),
            "sequence_parallel needs TP > 1",
        ),
    ],
)
def test_each_rule_names_the_numbers(layout, kwargs, message):
    with pytest.raises(LayoutError) as err:
        layout.validate(**{**MODEL, **kwargs})
    assert message in str(err.value)


def test_heads_not_divisible_by_groups():
    with pytest.raises(LayoutError, match="attention heads 8 are not divisible by query groups 3"):
        ParallelLayout().validate(
            world_size=1, num_layers=2, num_attention_heads=8, num_query_groups=3
        )


@pytest.mark.parametrize("bad", [0, -1])
def test_sizes_must_be_positive(bad):
    with pytest.raises(LayoutError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelLayout(tensor_model_parallel_size=bad)


def test_shared_rules_give_every_caller_the_same_message():
    """Each size rule lives in parallel/layout.py; the data path, the model config and the DP
    assignment call it (with their own exception type) instead of restating it."""
    import numpy as np

    from megatron_longctx.data.mixture import MixtureError
    from megatron_longctx.model.attention.a2a import check_a2a_heads
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.dp_assign import assign_global_batch, megatron_order
    from megatron_longctx.parallel.layout import (
        check_heads,
        check_sequence_length,
        num_micro_batches,
        samples_per_step,
    )

    with pytest.raises(LayoutError) as want:
        check_sequence_length(250, 2)
    assert "250 % 4 = 2; pick a multiple such as 252" in str(want.value)
    with pytest.raises(MixtureError) as got:
        check_sequence_length(250, 2, error=MixtureError)
    assert str(got.value) == str(want.value)

    with pytest.raises(LayoutError) as want:
        check_heads(8, 3)
    for call in (
        lambda: get_preset("tiny").with_updates(num_attention_heads=8, num_query_groups=3),
        lambda: check_a2a_heads(8, 3, 2),
    ):
        with pytest.raises(LayoutError) as got:
            call()
        assert str(got.value) == str(want.value)

    with pytest.raises(LayoutError) as want:
        num_micro_batches(8, 1, 3)
    assert "its 8 micro-batches are not divisible by DP 3" in str(want.value)
    for call in (lambda: assign_global_batch(np.ones(8), 3, 1), lambda: megatron_order(8, 3, 1)):
        with pytest.raises(LayoutError) as got:
            call()
        assert str(got.value) == str(want.value)
    assert num_micro_batches(12, 2, 3) == 2
    assert samples_per_step(4096, 1024) == 4
    with pytest.raises(LayoutError, match="use 3072 or 4096 tokens"):
        samples_per_step(4000, 1024)
