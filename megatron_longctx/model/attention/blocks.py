"""Block descriptions for document-masked attention: varlen segments, never per-token masks.

``CPLayout`` describes one packed sequence in the zigzag-within-documents layout
(parallel/cp_split.py): document i has padded length P_i (a multiple of 2 x CP), real length
R_i <= P_i (padding at its end) and chunk c_i = P_i / (2 CP); every CP rank's local tensor holds,
for every document, ``[chunk r | chunk 2 CP - 1 - r]`` at local offset L_i = sum_{j<i} 2 c_j. The
real tokens of a document on a rank are a contiguous prefix of its local segment (the early
chunk fills before the late one starts), so every problem below is a set of contiguous segments.

``VarlenBlock`` is one (query tensor, key tensor) attention problem as independent segments:
segment j pairs q rows ``[q_start_j, q_start_j + q_len_j)`` with k rows ``[k_start_j, k_start_j +
k_len_j)``, either causal (q_len == k_len, row i sees keys 0..i: the local block) or full (every
query sees every key: the ring steps, whose key chunks lie entirely in the queries' past). Rows
in no segment (padding, or queries with nothing to see at this step) get output 0, lse -inf and no
gradient. This is the ``cu_seqlens_q / cu_seqlens_k / causal`` description of flash-attn varlen and
Transformer Engine, with explicit starts so padding never enters a kernel.

Built host-side once per micro-batch (numpy, vectorised over documents) and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch


@dataclass(eq=False)
class VarlenBlock:
    """One attention problem between a query tensor and a key tensor (see the module docstring).

    Attributes:
        q_start, q_len, k_start, k_len: ``[n]`` int64 arrays, one entry per segment (all lengths
            > 0; segments of one tensor never overlap).
        causal: every segment is causal (then q_len == k_len) or every segment is full.
        num_q, num_k: rows of the query / key tensors the block refers to.
    """

    q_start: np.ndarray
    q_len: np.ndarray
    k_start: np.ndarray
    k_len: np.ndarray
    causal: bool
    num_q: int
    num_k: int
    _device_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        keep = (self.q_len > 0) & (self.k_len > 0)
        for name in ("q_start", "q_len", "k_start", "k_len"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64)[keep])
        if self.causal and not np.array_equal(self.q_len, self.k_len):
            raise ValueError("a causal block needs q_len == k_len in every segment")

    @property
    def num_segments(self) -> int:
        return int(self.q_len.size)

    @property
    def max_q(self) -> int:
        return int(self.q_len.max()) if self.num_segments else 0

    @property
    def max_k(self) -> int:
        return int(self.k_len.max()) if self.num_segments else 0

    def allowed_pairs(self) -> int:
        """(query, key) pairs the block computes: its work."""
        if self.causal:
            return int((self.q_len * (self.q_len + 1) // 2).sum())
        return int((self.q_len * self.k_len).sum())

    @cached_property
    def shape_groups(self) -> list[tuple[int, int, np.ndarray]]:
        """(q_len, k_len, segment indices) for segments of equal shape (batched on CPU)."""
        if not self.num_segments:
            return []
        keys = self.q_len * (self.max_k + 1) + self.k_len
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        return [(int(self.q_len[g[0]]), int(self.k_len[g[0]]), g) for g in np.split(order, bounds)]

    def rows(self, which: str, segments: np.ndarray | None = None) -> np.ndarray:
        """Row indices of the q ("q") or k ("k") tensor covered by ``segments``, in order."""
        start = self.q_start if which == "q" else self.k_start
        length = self.q_len if which == "q" else self.k_len
        if segments is not None:
            start, length = start[segments], length[segments]
        return _ranges(start, length)

    def device_tensors(self, device) -> dict[str, torch.Tensor]:
        """Packed-row gathers and cumulative lengths (int32) for GPU varlen kernels, cached."""
        key = str(device)
        if key not in self._device_cache:
            cu_q = np.concatenate([[0], np.cumsum(self.q_len)])
            cu_k = np.concatenate([[0], np.cumsum(self.k_len)])
            self._device_cache[key] = {
                "q_rows": torch.from_numpy(self.rows("q")).to(device),
                "k_rows": torch.from_numpy(self.rows("k")).to(device),
                "cu_q": torch.from_numpy(cu_q).to(device=device, dtype=torch.int32),
                "cu_k": torch.from_numpy(cu_k).to(device=device, dtype=torch.int32),
            }
        return self._device_cache[key]


def _ranges(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start_j, start_j + length_j)`` (vectorised)."""
    total = int(length.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(length) - length
    return np.repeat(start - offsets, length) + np.arange(total)


class CPLayout:
    """The zigzag-within-documents layout of one packed sequence over ``cp_size`` ranks.

    Args:
        cu_padded: cumulative padded document lengths (each a multiple of 2 x cp_size).
        cu_real: cumulative real lengths (same number of documents).
        cp_size: context-parallel size.
    """

    def __init__(self, cu_padded, cu_real, cp_size: int):
        cu_p = np.asarray(_as_ints(cu_padded), dtype=np.int64)
        cu_r = np.asarray(_as_ints(cu_real), dtype=np.int64)
        padded, real = np.diff(cu_p), np.diff(cu_r)
        if padded.size != real.size or (padded % (2 * cp_size)).any() or (real > padded).any():
            raise ValueError(
                f"boundaries are not a padded CP {cp_size} layout: padded lengths "
                f"{padded[:8].tolist()}..., real lengths {real[:8].tolist()}... (every padded "
                f"length must be a multiple of 2 x CP = {2 * cp_size} and >= the real length)"
            )
        self.cp_size = cp_size
        self.cu_padded, self.real = cu_p, real
        self.chunk = padded // (2 * cp_size)
        self.local_start = np.concatenate([[0], np.cumsum(2 * self.chunk)[:-1]]).astype(np.int64)
        self.local_tokens = int(cu_p[-1]) // cp_size
        self._blocks: dict[tuple[int, int], VarlenBlock] = {}

    def early_real(self, rank: int) -> np.ndarray:
        """Real tokens of every document in ``rank``'s early chunk (chunk ``rank``)."""
        return np.clip(self.real - rank * self.chunk, 0, self.chunk)

    def late_real(self, rank: int) -> np.ndarray:
        """Real tokens of every document in ``rank``'s late chunk (chunk 2 CP - 1 - rank)."""
        return np.clip(self.real - (2 * self.cp_size - 1 - rank) * self.chunk, 0, self.chunk)

    def local_real(self, rank: int) -> np.ndarray:
        return self.early_real(rank) + self.late_real(rank)

    def ring_block(self, rank: int, src: int) -> VarlenBlock:
        """Queries of ``rank`` vs the keys that ``src`` holds (ring step (rank - src) mod CP).

        src == rank: causal per document; src < rank: all queries vs src's early chunks (chunk
        src precedes both of rank's chunks); src > rank: rank's late queries vs all of src's keys
        (both of src's chunks precede chunk 2 CP - 1 - rank).
        """
        key = (rank, src)
        if key not in self._blocks:
            ls, t = self.local_start, self.local_tokens
            if src == rank:
                n = self.local_real(rank)
                block = VarlenBlock(ls, n, ls, n, True, t, t)
            elif src < rank:
                block = VarlenBlock(
                    ls, self.local_real(rank), ls, self.early_real(src), False, t, t
                )
            else:
                q0 = ls + self.chunk
                block = VarlenBlock(q0, self.late_real(rank), ls, self.local_real(src), False, t, t)
            self._blocks[key] = block
        return self._blocks[key]

    def gathered_order(self) -> np.ndarray:
        """Permutation p with gathered[p] in document (position) order.

        ``gathered`` is every rank's local tensor concatenated in rank order (the all-to-all
        result); gathered[p] is the CP 1 padded layout, where document i occupies
        ``[cu_padded[i], cu_padded[i + 1])`` with its real tokens first.
        """
        cp, t = self.cp_size, self.local_tokens
        chunks = []  # chunk j of every document, j = 0 .. 2 CP - 1, as gathered rows
        for j in range(2 * cp):
            rank = j if j < cp else 2 * cp - 1 - j
            offset = self.local_start + (0 if j < cp else self.chunk)
            chunks.append(rank * t + offset)
        starts = np.stack(chunks, axis=1).reshape(-1)  # doc-major, chunk-minor
        return _ranges(starts, np.repeat(self.chunk, 2 * cp))

    def document_block(self) -> VarlenBlock:
        """The causal per-document block of the whole sequence in document order (CP 1 layout)."""
        if (-1, -1) not in self._blocks:
            start, total = self.cu_padded[:-1], int(self.cu_padded[-1])
            self._blocks[(-1, -1)] = VarlenBlock(
                start, self.real, start, self.real, True, total, total
            )
        return self._blocks[(-1, -1)]


def _as_ints(cu) -> list[int]:
    if isinstance(cu, torch.Tensor):
        return cu.tolist()
    return [int(x) for x in cu]
