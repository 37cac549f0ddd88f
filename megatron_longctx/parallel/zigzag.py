"""The zigzag rule of context parallelism, in one place (the CP split, the attention blocks, THD
RoPE, the balance models and the CP units all call it).

A unit (one document, or a run of consecutive documents) is cut into 2 CP ordered chunks: equal
ones of a unit padded to a multiple of 2 x CP, or, without padding, chunks of floor/ceil(L / 2 CP)
tokens (``balanced_chunk_sizes``); rank r holds chunk r ("early") and chunk 2 CP - 1 - r
("late"), so every rank gets one chunk from each end of the unit's causal triangle and the same
attention work for one long document. Chunk j is held by rank min(j, 2 CP - 1 - j).
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


def equal_chunk_bounds(cu_padded, cp_size: int) -> np.ndarray:
    """``[units, 2 CP + 1]`` global chunk boundaries of units whose padded lengths (a multiple
    of 2 x CP) are cut into 2 CP equal chunks."""
    cu = np.asarray(cu_padded, dtype=np.int64)
    m = num_chunks(cp_size)
    return cu[:-1, None] + np.arange(m + 1) * (np.diff(cu) // m)[:, None]


def balanced_chunk_sizes(unit_lengths, cp_size: int) -> np.ndarray:
    """``[units, 2 CP]`` chunk sizes of units cut *without padding* (the "balanced" sharding).

    Every chunk of a unit of L tokens gets floor(L / 2 CP) tokens; the L mod 2 CP leftover tokens
    of all units are dealt one at a time, round-robin over the CP ranks across units (leftover g
    of the sample goes to rank g mod CP, into its early chunk on even laps g // CP and its late
    chunk on odd ones; two leftovers of one unit on one rank are a lap apart, so they land in
    different chunks). Every rank then holds within one token of (total / CP), and every rank
    holds its zigzag pair of every unit up to one token per chunk, so the attention work of every
    document is even too.
    """
    lengths = np.asarray(unit_lengths, dtype=np.int64)
    m = num_chunks(cp_size)
    sizes = np.repeat((lengths // m)[:, None], m, axis=1)
    rem = lengths % m
    g = np.arange(int(rem.sum()))
    unit = np.repeat(np.arange(lengths.size), rem)
    rank = g % cp_size
    chunk = np.where((g // cp_size) % 2 == 0, rank, m - 1 - rank)
    np.add.at(sizes, (unit, chunk), 1)
    return sizes


def held_per_unit(sizes: np.ndarray, cp_size: int) -> np.ndarray:
    """``[units, CP]`` tokens each rank holds of each unit with chunk sizes ``sizes``
    ``[units, 2 CP]`` (its early plus its late chunk)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, num_chunks(cp_size))
    return sizes[:, :cp_size] + sizes[:, cp_size:][:, ::-1]


def rank_totals(sizes: np.ndarray, cp_size: int) -> np.ndarray:
    """Tokens each CP rank holds of units with chunk sizes ``sizes`` ``[units, 2 CP]``."""
    return held_per_unit(sizes, cp_size).sum(0)
