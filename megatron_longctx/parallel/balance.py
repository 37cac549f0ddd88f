"""Attention work per CP rank (allowed query-key score pairs) under a token-to-rank assignment.

Two assignments of a packed sequence to CP ranks, both cutting into 2 x CP chunks and giving rank r
chunks r and 2 CP - 1 - r:

* ``"sequence_zigzag"``: chunks of the whole packed sequence (megatron's default; documents are not
  padded, the sequence is padded at its end to a multiple of 2 x CP);
* ``"document_zigzag"``: chunks of every document, each padded to a multiple of 2 x CP
  (parallel/cp_split.py; what our core attention and megatron's THD RoPE use).

A real query at position p of its document (positions restart per document) is allowed p + 1 keys;
padding queries are allowed none. Everything is vectorised with numpy: 512K-token samples are fine.
"""

from __future__ import annotations

import numpy as np

from megatron_longctx.parallel.zigzag import chunk_owner, num_chunks, padding_to_zigzag

SCHEMES = ("sequence_zigzag", "document_zigzag")


def attention_work_per_rank(
    doc_lengths, cp_size: int, scheme: str = "document_zigzag", linear_pairs_per_token: float = 0.0
) -> np.ndarray:
    """Allowed score pairs (plus optional linear work) on each CP rank.

    Args:
        doc_lengths: real document lengths of one packed sequence, in order.
        cp_size: context-parallel size.
        scheme: one of SCHEMES.
        linear_pairs_per_token: matmul work of one token expressed in score pairs (Llama-3-8B:
            ~28,600); 0 counts attention only.

    Returns:
        ``[cp_size]`` float64 work per rank.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    multiple = num_chunks(cp_size)
    if scheme == "document_zigzag":
        padded = lengths + (-lengths) % multiple
        doc = np.repeat(np.arange(len(lengths)), padded)
        starts = np.cumsum(padded) - padded
        pos = np.arange(int(padded.sum())) - starts[doc]
        chunk = pos // (padded[doc] // multiple)
        real = pos < lengths[doc]
    else:
        total = int(lengths.sum())
        padded_total = total + (-total) % multiple
        doc = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.cumsum(lengths) - lengths
        pos = np.zeros(padded_total, dtype=np.int64)
        pos[:total] = np.arange(total) - starts[doc]
        real = np.arange(padded_total) < total
        chunk = np.arange(padded_total) // (padded_total // multiple)
    work = np.where(real, pos + 1 + linear_pairs_per_token, 0.0)
    return np.bincount(chunk_owner(chunk, cp_size), weights=work, minlength=cp_size)


def imbalance(work: np.ndarray) -> float:
    """max / min work across ranks (inf if a rank has none)."""
    low = float(work.min())
    return float(work.max()) / low if low > 0 else float("inf")


def padding_fraction(doc_lengths, cp_size: int) -> float:
    """Extra tokens added by padding every document to a multiple of 2 x CP, as a fraction."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    return float(padding_to_zigzag(lengths, cp_size).sum() / max(int(lengths.sum()), 1))
