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
