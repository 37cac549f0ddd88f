"""Loss by token position on held-out long documents (Llama 2 Long's analysis).

Documents come from megatron indexed datasets (read with the project's checked ``sources`` reader,
so a wrong prefix or a truncated file is a clear error). Every document at least ``length + 1``
tokens long is eligible; ``num_documents`` of them are chosen with a seeded shuffle and their first
``length`` tokens are scored. Position t's loss is the NLL of token t + 1 given tokens 0..t; losses
are averaged inside position buckets whose edges double (0-1, 1-2, 2-4, ... ) up to ``length``, or
are spaced evenly with ``spacing="linear"``. The data must be tokenized with the model's tokenizer.
"""

from __future__ import annotations

import logging

import numpy as np

from megatron_longctx.data.sources import TokenReader, read_document_table

logger = logging.getLogger(__name__)


def bucket_edges(length: int, num_buckets: int, spacing: str = "log") -> list[int]:
    """Bucket edges over positions ``[0, length - 1)`` (the scored positions).

    Args:
        length: tokens per scored window (``length - 1`` losses).
        num_buckets: number of buckets (``log``: at most this many, doubling up to the end).
        spacing: ``log`` or ``linear``.
    """
    n = length - 1
    if spacing == "linear":
        edges = np.linspace(0, n, num_buckets + 1).round().astype(int)
    elif spacing == "log":
        edges = np.unique(np.concatenate([[0], np.geomspace(1, n, num_buckets).round(), [n]]))
    else:
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    return sorted({int(e) for e in edges})


def held_out_windows(
    prefixes: list[str], length: int, num_documents: int, seed: int
) -> tuple[list[list[int]], list[dict]]:
    """Chooses documents of at least ``length + 1`` tokens and returns their first ``length``.

    Raises:
        ValueError: no document is long enough (the message gives the longest one).
    """
    candidates, longest = [], 0
    for d, prefix in enumerate(prefixes):
        table = read_document_table(prefix)
        lengths = np.asarray(table.doc_lengths, dtype=np.int64)
        longest = max(longest, int(lengths.max()) if len(lengths) else 0)
        for i in np.flatnonzero(lengths >= length + 1):
            candidates.append((d, int(i), int(table.doc_offsets[i])))
    if not candidates:
        raise ValueError(
            f"no held-out document has {length + 1}+ tokens in {prefixes} (longest: "
            f"{longest}); lower loss_length or point loss_data at longer documents"
        )
    order = np.random.default_rng(seed).permutation(len(candidates))[:num_documents]
    reader = TokenReader(prefixes)
    windows, sources = [], []
    for k in sorted(order.tolist()):
        d, i, off = candidates[k]
        windows.append(reader.read(d, off, length).astype(np.int64).tolist())
        sources.append({"prefix": prefixes[d], "document": i})
    return windows, sources


def loss_by_position(
    model,
    prefixes: list[str],
    length: int,
    num_documents: int,
    seed: int,
    num_buckets: int = 8,
    batch_size: int = 4,
    spacing: str = "log",
) -> dict:
    """Mean NLL per position bucket over held-out documents.

    Returns:
        ``{"length", "documents", "bucket_edges", "bucket_loss", "mean_loss", "per_position"}``;
        ``per_position`` is the mean loss at every position (for the plot).
    """
    windows, sources = held_out_windows(prefixes, length, num_documents, seed)
    if max(max(w) for w in windows) >= model.tokenizer.vocab_size:
        raise ValueError(
            "held-out data holds token ids beyond the tokenizer's vocabulary: it was "
            "tokenized with another tokenizer; re-run preprocessing with the model's"
        )
    losses = []
    for start in range(0, len(windows), batch_size):
        losses += model.token_losses(windows[start : start + batch_size])
    per_position = np.mean(np.stack(losses), axis=0)
    edges = bucket_edges(length, num_buckets, spacing)
    buckets = [float(per_position[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return {
        "length": length,
        "documents": sources,
        "bucket_edges": edges,
        "bucket_loss": buckets,
        "mean_loss": float(per_position.mean()),
        "per_position": [float(x) for x in per_position],
    }
