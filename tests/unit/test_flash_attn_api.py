"""Issue 27, points 2 and 5: flash-attn's real calling conventions; broken GPU packages, on CPU.

What replaces the GPU: flash-attn's CUDA extension. ``flash_attn.flash_attn_interface`` is a
stand-in module whose ``_flash_attn_varlen_forward/_backward`` are ``torch.library.custom_op``
objects with flash-attn 2.8.3's exact schema (names, types, defaults, ``mutates_args``; copied from
the v2.8.3 tag), or plain functions with 2.6.3's signature and return tuple, implemented on CPU by
dense per-segment attention (the reference's mask rule, autograd for the backward). What it proves:
the kernel calls each version's interface correctly (arguments, the log-sum-exp's position, the
in-place gradients), checked against the dense reference (reference.py) forward and backward. What
it cannot prove: flash-attn's numerics on a GPU (untested on GPU).
"""

import inspect
import sys
import types
from typing import Optional, Tuple

import pytest
import torch

from megatron_longctx.model.attention import flash_attn_api, kernels
from megatron_longctx.model.attention.blocks import CPLayout
from megatron_longctx.model.attention.kernel_cuda import FlashAttnKernel
from megatron_longctx.model.attention.kernels import block_attention
from megatron_longctx.model.attention.reference import document_causal_attention

DOCS = [6, 10, 2, 8]


def _segments(q, k, v, cu_q, cu_k, scale, causal):
    """Dense per-segment attention: (out [nq, hq, d], lse [hq, nq])."""
    outs, lses = [], []
    group = q.shape[1] // k.shape[1]
    for j in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[j]), int(cu_q[j + 1]), int(cu_k[j]), int(cu_k[j + 1])
        qi = q[qs:qe].transpose(0, 1)
        ki = k[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        s = qi @ ki.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(torch.ones(qe - qs, ke - ks, dtype=torch.bool).triu(1), -torch.inf)
        lse = torch.logsumexp(s, -1)  # [hq, n]
        outs.append((torch.exp(s - lse[..., None]) @ vi).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _grads(dout, q, k, v, cu_q, cu_k, scale, causal):
    """Dense attention gradients per segment, by the textbook formulas (autograd does not run
    inside a custom op): dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = s dS K, dK = s dS^T Q."""
    hq, hk = q.shape[1], k.shape[1]
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    for j in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[j]), int(cu_q[j + 1]), int(cu_k[j]), int(cu_k[j + 1])
        qi, doi = q[qs:qe].transpose(0, 1), dout[qs:qe].transpose(0, 1)  # [hq, n, d]
        ki = k[ks:ke].repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        vi = v[ks:ke].repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        s = qi @ ki.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(torch.ones(qe - qs, ke - ks, dtype=torch.bool).triu(1), -torch.inf)
        p = torch.softmax(s, -1)
        o = p @ vi
        ds = p * (doi @ vi.transpose(1, 2) - (doi * o).sum(-1, keepdim=True))
        fold = lambda x: x.reshape(hk, hq // hk, *x.shape[1:]).sum(1).transpose(0, 1)  # noqa: E731
        grads[0][qs:qe] += (scale * ds @ ki).transpose(0, 1)
        grads[1][ks:ke] += fold(scale * ds.transpose(1, 2) @ qi)
        grads[2][ks:ke] += fold(p.transpose(1, 2) @ doi)
    return grads


# flash-attn 2.8.3's schema (flash_attn/flash_attn_interface.py at the v2.8.3 tag)
@torch.library.custom_op("longctx_fa_test::_flash_attn_varlen_forward", mutates_args=())
def fwd_28(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assert (window_size_left, window_size_right, softcap, dropout_p) == (-1, -1, 0.0, 0.0)
    out, lse = _segments(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, lse.float(), q.new_empty(0), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op(
    "longctx_fa_test::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv")
)
def bwd_28(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    assert softmax_lse.shape == (q.shape[1], q.shape[0])  # [hq, nq]
    for buf, g in zip((dq, dk, dv), _grads(dout, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                            softmax_scale, causal)):  # fmt: skip
        buf.copy_(g)
    return softmax_lse.new_zeros(softmax_lse.shape)


def fwd_26(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
           softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
           return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None):  # fmt: skip
    """2.6.3's signature and return tuple (out, q, k, v, out_padded, softmax_lse, S_dmask, rng)."""
    assert tuple(window_size) == (-1, -1) and softcap == 0.0
    out, lse = _segments(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, q, k, v, out, lse.float(), None, None


def bwd_26(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
           max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           deterministic, rng_state=None):  # fmt: skip
    for buf, g in zip((dq, dk, dv), _grads(dout, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                            softmax_scale, causal)):  # fmt: skip
        buf.copy_(g)
    return dq, dk, dv, None


def _install(monkeypatch, version, fwd, bwd):
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_varlen_forward = fwd
    interface._flash_attn_varlen_backward = bwd
    package.flash_attn_interface = interface
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    kernels.resolve_kernel.cache_clear()


def _check_against_reference(dtype=torch.float64):
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()])
    block = CPLayout(cu, cu, 1).ring_block(0, 0)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(sum(DOCS), h, 8, generator=g, dtype=dtype) for h in (4, 2, 2)]
    dout = torch.randn(sum(DOCS), 4, 8, generator=g, dtype=dtype)
    results = []
    for fn in (
        lambda q, k, v: block_attention(q, k, v, block, 0.3, FlashAttnKernel()),
        lambda q, k, v: document_causal_attention(q, k, v, cu, cu, 0.3),
    ):
        q, k, v = (x.clone().requires_grad_() for x in base)
        out = fn(q, k, v)
        out.backward(dout)
        results.append((out, q.grad, k.grad, v.grad))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)


def test_flash_attn_28_custom_op(monkeypatch):
    """2.7+ ops are custom_op objects: no signature to match keywords against (the fault the old
    ``inspect.signature`` filter hit); the kernel calls them positionally."""
    assert list(inspect.signature(fwd_28).parameters) == ["args", "kwargs"]
    _install(monkeypatch, "2.8.3", fwd_28, bwd_28)
    _check_against_reference()


def test_flash_attn_26_plain_functions(monkeypatch):
    """2.6: the log-sum-exp is the 6th return value (``res[1]`` would be q)."""
    _install(monkeypatch, "2.6.3", fwd_26, bwd_26)
    _check_against_reference()


@pytest.mark.parametrize("version", ["2.5.9", "2.9.0", "3.0.0b1"])
def test_unsupported_versions_are_refused(monkeypatch, version):
    _install(monkeypatch, version, fwd_28, bwd_28)
    with pytest.raises(flash_attn_api.FlashAttnUnavailable, match="not supported.*flash-attn>=2.6"):
        kernels.resolve_kernel("flash_attn", torch.device("cuda", 0), torch.bfloat16)
    auto = kernels.resolve_kernel("auto", torch.device("cuda", 0), torch.bfloat16)
    assert auto.name == "torch_flash"
    kernels.resolve_kernel.cache_clear()


def test_auto_picks_flash_attn_only_when_it_imports(monkeypatch):
    cuda = torch.device("cuda", 0)
    _install(monkeypatch, "2.8.3", fwd_28, bwd_28)
    assert kernels.resolve_kernel("auto", cuda, torch.bfloat16).name == "flash_attn"
    broken = types.ModuleType("flash_attn.flash_attn_interface")  # a half-installed build
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", None)
    kernels.resolve_kernel.cache_clear()
    assert kernels.resolve_kernel("auto", cuda, torch.bfloat16).name == "torch_flash"
    with pytest.raises(flash_attn_api.FlashAttnUnavailable, match="does not import.*no-build-iso"):
        kernels.resolve_kernel("flash_attn", cuda, torch.bfloat16)
    del broken
    kernels.resolve_kernel.cache_clear()


def _install_te(monkeypatch, version, broken=False):
    package = types.ModuleType("transformer_engine")
    package.__version__ = version
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    # None in sys.modules makes the import raise ImportError: a half-installed build whose
    # compiled extension does not load
    pytorch = None if broken else types.ModuleType("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())


@pytest.mark.parametrize(
    "version,broken,needle",
    [("2.1.0", False, "2.1.0 is not supported"), ("3.0.0", False, "3.0.0 is not supported"),
     ("2.8.0", True, "does not import")],
)  # fmt: skip
def test_transformer_engine_wrong_or_half_installed(monkeypatch, version, broken, needle):
    """Point 5: backend 'te' with a wrong or half-installed TE: one line naming the fix; 'auto'
    falls back to the local layers (with the reason logged) instead of a traceback in megatron."""
    from megatron_longctx.model import specs
    from megatron_longctx.model.attention.gpu import TransformerEngineUnavailable

    _install_te(monkeypatch, version, broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TransformerEngineUnavailable, match=needle) as err:
        specs.resolve_backend("te")
    assert "\n" not in str(err.value) and "--no-build-isolation" in str(err.value)
    assert specs.resolve_backend("auto", torch.device("cuda", 0)) == "local"
    _install_te(monkeypatch, "2.8.0")
    cuda = torch.device("cuda", 0)  # "auto" asks the training device (issue 26)
    assert specs.resolve_backend("te") == "te" and specs.resolve_backend("auto", cuda) == "te"
