"""DP ranks that run different numbers of micro-batches in a step (parallel/dp_assign.py
``assign_variable``) train exactly as megatron's equal-count order: megatron's schedule sums the
token counts of however many micro-batches a rank runs and ``finalize_model_grads`` divides the
DP-all-reduced gradients by the global count, so the loss and every gradient are the same.

Two gloo ranks, DP 2, a tiny GPTModel; the same global batch once in megatron's order (2 + 2
micro-batches) and once balanced by a work model that makes one sample outweigh all the others
(so one rank runs it alone and the other the three light ones).
"""

import numpy as np
import pytest
import torch

from megatron_longctx.testing.data import tiny_corpus, two_component_index
from megatron_longctx.testing.distributed import run_distributed
from tests.distributed.common import max_rel_err

SEQ, GLOBAL_BATCH = 128, 4


class _OneHeavy:
    """Work model: a sample's cost grows as the cube of its attention pairs, so the heaviest
    sample of the batch outweighs the rest together (a pure function of the lengths)."""

    def sample(self, doc_lengths):
        pairs = float(np.sum(np.asarray(doc_lengths, dtype=np.float64) ** 2))
        return np.array([pairs**3]), 0


def _loader(data, dp_rank, dp_size, balanced):
    from megatron_longctx.data.loader import MixtureLoader

    index = two_component_index(data, SEQ, GLOBAL_BATCH, long_weight=0.25)
    work = _OneHeavy() if balanced else None
    return MixtureLoader(index, GLOBAL_BATCH, 1, dp_rank, dp_size, work=work)


def _step(rank, world, data):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.full_state import gather_full
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.batch import to_model_batch
    from megatron_longctx.training.setup import wrap_ddp
    from megatron_longctx.training.step import forward_backward

    cfg = get_preset("tiny").with_updates(make_vocab_size_divisible_by=128)
    layout = ParallelLayout(1, 1, 1)
    initialize_model_parallel(layout)
    out = {}
    for balanced in (False, True):
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        torch.manual_seed(5)
        chunks = wrap_ddp([build_gpt_model(cfg, layout, core_attention="local", seq_length=SEQ)])
        loader = _loader(data, parallel_state.get_data_parallel_rank(), 2, balanced)
        micro = [to_model_batch(next(loader), 1, 0, None) for _ in range(loader.num_micro_batches)]
        result = forward_backward(chunks, micro, seq_length=SEQ, micro_batch_size=1)
        out[balanced] = (result.loss, result.num_tokens, len(micro), gather_full(chunks[0], "grad"))
    return out


@pytest.mark.timeout(300)
def test_variable_micro_batch_counts_give_the_equal_count_loss_and_gradients(tmp_path):
    data = tiny_corpus(tmp_path)
    results = run_distributed(_step, 2, args=(data,), timeout=240)
    assert sorted(r[True][2] for r in results) == [1, 3]  # the heavy sample ran alone
    assert [r[False][2] for r in results] == [2, 2]
    for r in results:
        (loss_eq, tok_eq, _, g_eq), (loss_var, tok_var, _, g_var) = r[False], r[True]
        assert tok_var == tok_eq
        assert loss_var == pytest.approx(loss_eq, rel=1e-6)
        assert max(max_rel_err(g_var[n], g_eq[n]) for n in g_eq) <= 1e-5
