"""Shared helpers of the attention tests: padded boundaries and the pairs a ring layout computes."""

from __future__ import annotations


def padded_cu(real_lengths: list[int], cp: int, pad_doc: int = 0) -> tuple[list[int], list[int]]:
    """(cu_padded, cu_real) for documents of these real lengths, each padded to a multiple of
    2 x CP, plus an optional padding-only document of ``pad_doc`` x 2 x CP tokens."""
    multiple = 2 * cp
    cu_p, cu_r = [0], [0]
    for n in real_lengths:
        cu_p.append(cu_p[-1] + n + (-n) % multiple)
        cu_r.append(cu_r[-1] + n)
    if pad_doc:
        cu_p.append(cu_p[-1] + pad_doc * multiple)
        cu_r.append(cu_r[-1])
    return cu_p, cu_r


def ring_pairs(layout, cu_padded, cp: int) -> list[tuple[int, int]]:
    """Global (query, key) pairs that ``layout``'s ring blocks compute, over every rank and step."""
    from megatron_longctx.parallel.cp_split import rank_token_index

    index = [rank_token_index(cu_padded, cp, r, layout.bounds).tolist() for r in range(cp)]
    pairs = []
    for rank in range(cp):
        for src in range(cp):
            b = layout.ring_block(rank, src)
            for qs, ql, ks, kl in zip(b.q_start, b.q_len, b.k_start, b.k_len):
                for i in range(ql):
                    for j in range(kl):
                        if not b.causal or j <= i:
                            pairs.append((index[rank][qs + i], index[src][ks + j]))
    return pairs
