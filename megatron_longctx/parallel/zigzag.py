"""The zigzag rule of context parallelism, in one place (the CP split, the attention blocks, THD
RoPE, the balance models and the CP units all call it).

A unit (one document, or a run of consecutive documents) padded to a multiple of 2 x CP is cut
into 2 CP equal chunks; rank r holds chunk r ("early") and chunk 2 CP - 1 - r ("late"), so every
rank gets one chunk from each end of the unit's causal triangle and the same attention work for
one long document. Chunk j is held by rank min(j, 2 CP - 1 - j).
"""

from __future__ import annotations

import numpy as np


def num_chunks(cp_size: int) -> int:
    """Chunks per unit: 2 x CP (a unit's padded length is a multiple of it)."""
    return 2 * cp_size


def rank_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """(early, late) chunk indices rank ``cp_rank`` holds of every unit."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def chunk_owner(chunk, cp_size: int):
    """The CP rank holding chunk index ``chunk`` (an int or a numpy array of them)."""
    return np.minimum(chunk, 2 * cp_size - 1 - np.asarray(chunk))


def padding_to_zigzag(lengths, cp_size: int):
    """Tokens that pad each unit of ``lengths`` tokens to a multiple of 2 x CP."""
    return (-np.asarray(lengths)) % num_chunks(cp_size)
