"""The chunked loss's setting (one rule for trainer and planner) and its math in one process
against a dense fp64 cross entropy (no megatron code; the distributed test compares with
megatron's own path)."""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.config.loading import ConfigError
from megatron_longctx.config.schema import StageConfig
from megatron_longctx.model.config import resolve_loss_chunk_tokens
from megatron_longctx.model.loss import ChunkedLinearCrossEntropy, token_logprobs


def _stage(**kw) -> StageConfig:
    return StageConfig(name="s", steps=1, global_batch_size=1, **kw)


def test_loss_chunk_setting_rule_and_errors():
    assert resolve_loss_chunk_tokens(None, 8192) is None  # auto: megatron's path at <= 8K
    assert resolve_loss_chunk_tokens(None, 8193) == 2048  # auto: chunked above Llama 3's 8K
    assert resolve_loss_chunk_tokens(0, 524288) is None
    assert resolve_loss_chunk_tokens(512, 256) == 512
    assert _stage(seq_length=65536).resolved_loss_chunk_tokens == 2048
    assert _stage(seq_length=256).resolved_loss_chunk_tokens is None
    assert _stage(seq_length=256, loss_chunk_tokens=64).resolved_loss_chunk_tokens == 64
    with pytest.raises(ConfigError, match="loss_chunk_tokens must be >= 0"):
        _stage(seq_length=256, loss_chunk_tokens=-1)


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_cross_entropy_matches_dense_fp64(chunk, with_mask):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 12, 8, 37
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).double()
    dense = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="none")
    (0.7 * (dense * mask).sum()).backward()
    want = (dense.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    mode = "early" if with_mask else "recompute"
    before = ChunkedLinearCrossEntropy.backward_modes[mode]
    losses = ChunkedLinearCrossEntropy.apply(
        hidden, weight, target, chunk, None, mask if with_mask else None
    )
    (0.7 * (losses * mask).sum()).backward()
    assert ChunkedLinearCrossEntropy.backward_modes[mode] == before + 1
    for got, ref in zip((losses, hidden.grad, weight.grad), want):  # softmax in fp32 (megatron)
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err <= 1e-6, err
    logp, hit = token_logprobs(hidden.detach(), weight.detach(), target, chunk)
    full = (hidden @ weight.t()).detach()
    torch.testing.assert_close(logp.double(), -dense.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(hit, full.argmax(-1) == target)


def test_token_logprobs_leaves_out_padding_rows():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(40, 8, generator=g) * 3
    target = torch.randint(0, 33, (20,), generator=g)  # 33 real ids, 7 padding rows
    real = (hidden.double() @ weight[:33].double().t()).log_softmax(-1)
    target[:6] = real.argmax(-1)[:6]  # some certain hits
    logp, hit = token_logprobs(hidden, weight, target, 7, vocab_size=33)
    err = (logp.double() - real.gather(1, target[:, None])[:, 0]).abs().max()
    assert err <= 1e-5, err
    assert torch.equal(hit, real.argmax(-1) == target) and hit[:6].all()
