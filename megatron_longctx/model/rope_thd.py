"""THD (packed, per-document) RoPE without host syncs, for megatron's unfused path.

megatron-core 0.16.1's ``rope_utils._apply_rotary_pos_emb_thd`` (used when ``apply_rope_fusion``
is off, i.e. without Transformer Engine) reads the document lengths back to the host
(``.tolist()``, plus a tensor comparison in an ``if``) and slices the frequencies once per document
(twice under CP): per layer, for q and for k, 4 host syncs and ~2,000 small kernels for a 512K
micro-batch of ~500 documents (benchmarks/bench_rope_thd.py). A GPU waits at every sync.

``apply_rotary_pos_emb_thd`` computes the same result in one gather: every local token's position
inside its document follows from the boundaries alone (zigzag within documents, the layout of
parallel/cp_split.py: rank r holds chunks r and 2 CP - 1 - r of every padded document), with
``repeat_interleave(..., output_size=t.size(0))`` so no size is read back. It keeps megatron's two
frequency layouts: ``freqs`` of the whole padded batch (positions offset by the document start) or
of the longest document (positions restart per document). With Transformer Engine the fused THD
RoPE is used instead (model/build.py sets ``apply_rope_fusion``).

``install()`` makes megatron call it (its dispatcher looks the function up at call time).
Shape legend (THD): t ``[t, h, d]``; freqs ``[s, 1, 1, d]``.
"""

from __future__ import annotations

import torch

from megatron_longctx.parallel.zigzag import rank_chunks

_INSTALLED = False
ORIGINAL = None  # megatron's own function, kept by install() (the tests' reference)


def local_positions(cu_seqlens: torch.Tensor, num_local: int, cp_size: int, cp_rank: int):
    """(document index, position inside the padded document) of each of this rank's tokens.

    Args:
        cu_seqlens: ``[n + 1]`` padded document boundaries of the whole (pre-CP) sequence, on
            the device; every padded length is a multiple of 2 x CP.
        num_local: this rank's token count (``cu_seqlens[-1] / cp_size``, known on the host).

    Equal chunks are read off the boundaries; a batch with ``cp_chunks`` (parallel/cp_split.py)
    brings this rank's (unit, position) pairs on the tensor (attribute ``longctx_positions``).
    """
    bound = getattr(cu_seqlens, "longctx_positions", None)
    if bound is not None:  # unequal chunks: from the batch path (cp_split.bind_rope_positions)
        return bound
    cu = cu_seqlens.long()
    local_len = (cu[1:] - cu[:-1]) // cp_size
    doc = torch.repeat_interleave(
        torch.arange(local_len.numel(), device=cu.device), local_len, output_size=num_local
    )
    local_start = torch.cumsum(local_len, 0) - local_len
    j = torch.arange(num_local, device=cu.device) - local_start[doc]
    if cp_size == 1:
        return doc, j
    chunk = (local_len // 2)[doc]
    late = j >= chunk
    early_chunk, late_chunk = rank_chunks(cp_size, cp_rank)
    pos = torch.where(late, late_chunk * chunk + (j - chunk), early_chunk * chunk + j)
    return doc, pos


def apply_rotary_pos_emb_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    rotary_interleaved: bool = False,
    multi_latent_attention: bool = False,
    mscale: float = 1.0,
    cp_group=None,
) -> torch.Tensor:
    """Drop-in for megatron's ``_apply_rotary_pos_emb_thd`` (same arguments and result)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    if cp_group is None:
        raise ValueError("cp_group must be provided for THD format RoPE")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    num_local = t.size(0)
    doc, pos = local_positions(cu_seqlens, num_local, cp_size, cp_rank)
    # megatron's test `freqs.size(0) == cu_seqlens[-1]`, from host sizes: t holds 1 / CP of it
    if freqs.dim() >= 1 and freqs.size(0) == num_local * cp_size:
        pos = pos + cu_seqlens.long()[doc]  # freqs of the whole batch: offset by document start
    return _apply_rotary_pos_emb_bshd(
        t.unsqueeze(1),
        freqs[pos],
        rotary_interleaved=rotary_interleaved,
        multi_latent_attention=multi_latent_attention,
        mscale=mscale,
    ).squeeze(1)


def install() -> None:
    """Routes megatron's unfused THD RoPE through ``apply_rotary_pos_emb_thd``. Idempotent."""
    global _INSTALLED, ORIGINAL
    if _INSTALLED:
        return
    from megatron.core.models.common.embeddings import rope_utils

    ORIGINAL = rope_utils._apply_rotary_pos_emb_thd
    rope_utils._apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd
    _INSTALLED = True
