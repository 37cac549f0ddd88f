"""The training loss is the mean over every loss token of the global batch, exactly, whatever the
split into micro-batches, DP ranks and CP ranks; gradients too.

Reference (independent of the project's attention, packing and CP code): an unsharded GPTModel with
megatron's own local spec (DotProductAttention, causal), run on each document of each packed sample
separately, positions from 0 (document masking = independent documents), summing token losses.
"""

import pytest
import torch

from megatron_longctx.testing.data import tiny_corpus, two_component_index
from megatron_longctx.testing.distributed import run_distributed
from tests.distributed.common import max_rel_err

SEQ, GLOBAL_BATCH = 128, 4


def _loader(data, dp_rank, dp_size, micro):
    from megatron_longctx.data.loader import MixtureLoader

    index = two_component_index(data, SEQ, GLOBAL_BATCH, long_weight=0.5)
    return MixtureLoader(index, GLOBAL_BATCH, micro, dp_rank, dp_size)


def _step(rank, world, data, tp, cp, micro):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.full_state import gather_full, load_full
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.batch import to_model_batch
    from megatron_longctx.training.setup import wrap_ddp
    from megatron_longctx.training.step import forward_backward

    cfg = get_preset("tiny").with_updates(make_vocab_size_divisible_by=128)
    layout = ParallelLayout(tp, 1, cp)
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    attn = "local" if cp == 1 else "ring"
    chunks = wrap_ddp([build_gpt_model(cfg, layout, core_attention=attn, seq_length=SEQ)])
    dp = parallel_state.get_data_parallel_world_size()
    loader = _loader(data, parallel_state.get_data_parallel_rank(), dp, micro)
    micro_batches = [
        to_model_batch(
            next(loader),
            cp,
            parallel_state.get_context_parallel_rank(),
            parallel_state.get_context_parallel_group(),
        )
        for _ in range(loader.num_micro_batches)
    ]
    result = forward_backward(chunks, micro_batches, seq_length=SEQ, micro_batch_size=micro)
    params, grads = gather_full(chunks[0], "param"), gather_full(chunks[0], "grad")

    # Reference on the whole global batch, document by document, megatron's own attention.
    initialize_model_parallel(ParallelLayout(1, 1, 1))
    ref = build_gpt_model(cfg, ParallelLayout(1, 1, 1), backend="local", seq_length=SEQ)
    load_full(ref, params)
    full = _loader(data, 0, 1, GLOBAL_BATCH)
    batch = next(full)
    total, count = 0.0, 0.0
    cu = batch["cu_seqlens"].tolist()
    flat = {k: batch[k].reshape(-1) for k in ("tokens", "labels", "loss_mask")}
    for a, b in zip(cu, cu[1:]):
        toks, labels, mask = flat["tokens"][a:b], flat["labels"][a:b], flat["loss_mask"][a:b]
        losses = ref(toks[None], torch.arange(b - a)[None], None, labels=labels[None])
        total = total + (losses[0] * mask).sum()
        count += mask.sum().item()
    loss = total / count
    loss.backward()
    worst = max(max_rel_err(grads[n], p.grad) for n, p in ref.named_parameters())
    return result.loss, loss.item(), result.num_tokens, int(count), worst


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,cp,micro", [(1, 2, 1), (1, 1, 1), (2, 1, 2)])
def test_global_token_average_matches_reference(tmp_path, tp, cp, micro):
    data = tiny_corpus(tmp_path)
    for loss, ref_loss, tokens, ref_tokens, worst in run_distributed(
        _step, 2, args=(data, tp, cp, micro), timeout=240
    ):
        assert tokens == ref_tokens
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert worst <= 1e-5
