"""Block descriptions for document-masked attention: varlen segments, never per-token masks.

``CPLayout`` describes one packed sequence in the zigzag-within-units layout (parallel/cp_split.py,
parallel/units.py): unit i (one document, or a run of documents) is cut into 2 CP ordered chunks
(equal, or differing by a token under the "balanced" sharding); every CP rank's local tensor
holds, for every unit, ``[chunk r | chunk 2 CP - 1 - r]`` at local offset L_i(r) = the rank's
tokens of the units before it. Documents are
intervals inside units (``docs``); the tokens of one document on one rank are contiguous in the
local order (see ``CPLayout``), so every problem below is a set of contiguous segments, one per
(document, rank) pair.

``VarlenBlock`` is one (query tensor, key tensor) attention problem as independent segments:
segment j pairs q rows ``[q_start_j, q_start_j + q_len_j)`` with k rows ``[k_start_j, k_start_j +
k_len_j)``, either causal (q_len == k_len, row i sees keys 0..i: the local block) or full (every
query sees every key: the ring steps, whose key chunks lie entirely in the queries' past). Rows
in no segment (padding, or queries with nothing to see at this step) get output 0, lse -inf and no
gradient. This is the ``cu_seqlens_q / cu_seqlens_k / causal`` description of flash-attn varlen and
Transformer Engine, with explicit starts so padding never enters a kernel.

Built host-side once per micro-batch (numpy, vectorised over documents) and shared by all layers:
the batch path (training/batch.py) builds the layout from the loader's host boundaries, and
``CPLayout.plan_device`` copies every block's row indices and ``cu_seqlens`` for the CUDA varlen
kernels in one non-blocking copy from pinned memory, so attention never reads the device back nor
copies synchronously inside the ring loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from megatron_longctx.parallel.cp_split import CPSplitError, _as_list, _ranges, layout_bounds
from megatron_longctx.parallel.zigzag import chunk_owner, held_per_unit, num_chunks, rank_chunks


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

    def host_arrays(self) -> dict[str, np.ndarray]:
        """What ``device_tensors`` holds, on the host: rows (int64) and cu_q / cu_k (int32)."""
        return {
            "q_rows": self.rows("q"),
            "k_rows": self.rows("k"),
            "cu_q": np.concatenate([[0], np.cumsum(self.q_len)]).astype(np.int32),
            "cu_k": np.concatenate([[0], np.cumsum(self.k_len)]).astype(np.int32),
        }

    def device_tensors(self, device) -> dict[str, torch.Tensor]:
        """Packed-row gathers and cumulative lengths (int32) for GPU varlen kernels, cached
        (``CPLayout.plan_device`` fills the cache ahead; else one copy per block here)."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = {
                name: torch.from_numpy(a).to(device) for name, a in self.host_arrays().items()
            }
        return self._device_cache[key]


class CPLayout:
    """The zigzag layout of one packed sequence over ``cp_size`` ranks, by units and documents.

    A *unit* (one entry of ``cu_padded``, parallel/units.py) is cut into 2 CP ordered chunks
    (``chunks``: the batch's ``cp_chunks`` boundaries, chunk sizes may differ; default: equal
    chunks of c = P / (2 CP) of a padded length P, a multiple of 2 x CP); rank r holds chunks r and
    2 CP - 1 - r of every unit, in unit order. Documents are intervals inside units; tokens in no
    document are padding. One document per unit with its real tokens first (``docs=None``) is
    the zigzag-within-documents layout; several per unit are grouped documents (``doc_spans``
    from parallel/cp_split.py).

    For one document, the tokens a rank holds are contiguous in the rank's local order: if the
    document touches both of the rank's chunks of its unit, it covers everything between them, so
    its early part is a suffix of the early chunk and its late part a prefix of the late chunk.

    Args:
        cu_padded: cumulative unit lengths, padding included.
        cu_real: cumulative real lengths of the units (same number of units).
        cp_size: context-parallel size.
        docs: optional ``(starts, ends)`` of every document in the global layout (sorted,
            disjoint, each inside one unit, together covering ``cu_real``'s token counts); default:
            each unit's first ``real`` tokens are one document.
        chunks: optional ``[units, 2 CP + 1]`` chunk boundaries (cp_split.layout_bounds checks
            them: every rank must hold the same number of tokens).
    """

    def __init__(self, cu_padded, cu_real, cp_size: int, docs=None, chunks=None):
        try:
            bounds = layout_bounds(cu_padded, cu_real, cp_size, chunks)
        except CPSplitError as err:
            raise ValueError(f"boundaries are not a CP {cp_size} layout: {err}") from None
        self.cp_size = cp_size
        self.cu_padded = np.asarray(_as_list(cu_padded), dtype=np.int64)
        self.real = np.diff(np.asarray(_as_list(cu_real), dtype=np.int64))
        self.bounds, self.sizes = bounds, np.diff(bounds, axis=1)
        held = held_per_unit(self.sizes, cp_size)  # [units, rank]
        #: [units, CP] local offset of every unit on every rank
        self.local_start = np.cumsum(held, axis=0) - held
        self.local_tokens = int(held.sum(0)[0]) if held.size else 0
        if docs is None:
            starts, ends = self.cu_padded[:-1], self.cu_padded[:-1] + self.real
        else:
            starts, ends = (np.asarray(_as_list(x), dtype=np.int64) for x in docs)
        keep = ends > starts
        self.doc_start, self.doc_end = starts[keep], ends[keep]
        self.doc_unit = np.searchsorted(self.cu_padded, self.doc_start, side="right") - 1
        self._check_docs(docs is not None)
        self._blocks: dict = {}
        self._parts: dict[int, tuple] = {}

    def _check_docs(self, given: bool) -> None:
        s, e, u, cu = self.doc_start, self.doc_end, self.doc_unit, self.cu_padded
        bad = (u < 0) | (u >= self.real.size) | (s < 0)
        if not bad.any():
            bad |= e > cu[np.minimum(u + 1, cu.size - 1)]
        overlap = s[1:] < e[:-1] if s.size > 1 else np.zeros(0, dtype=bool)
        per_unit = np.bincount(u[~bad], weights=(e - s)[~bad], minlength=self.real.size)
        if bad.any() or overlap.any() or (given and not np.array_equal(per_unit, self.real)):
            raise ValueError(
                "document intervals must be sorted, disjoint, each inside one unit of cu_padded, "
                f"and add up to each unit's real length: units {np.diff(cu).tolist()[:8]}..., "
                f"real {self.real.tolist()[:8]}..., documents {s.tolist()[:8]}..{e.tolist()[:8]}"
            )

    def check_local(self, num_tokens: int, cp_size: int) -> None:
        """Refuses local tensors that do not belong to this layout (another CP size or batch)."""
        if self.cp_size != cp_size or num_tokens != self.local_tokens:
            raise ValueError(
                f"the layout is for CP {self.cp_size} with {self.local_tokens} tokens per rank, "
                f"but the CP group has {cp_size} ranks and this rank holds {num_tokens} tokens"
            )

    def rank_parts(self, rank: int) -> tuple[np.ndarray, ...]:
        """Per document: local (start, length) of its early and of its late part on ``rank``."""
        if rank not in self._parts:
            unit, bounds = self.doc_unit, self.bounds
            early, late = rank_chunks(self.cp_size, rank)
            e0, e1 = bounds[unit, early], bounds[unit, early + 1]
            t0, t1 = bounds[unit, late], bounds[unit, late + 1]
            e_lo, e_hi = np.clip(self.doc_start, e0, e1), np.clip(self.doc_end, e0, e1)
            t_lo, t_hi = np.clip(self.doc_start, t0, t1), np.clip(self.doc_end, t0, t1)
            local = self.local_start[unit, rank]
            e_start = local + e_lo - e0
            t_start = local + self.sizes[unit, early] + t_lo - t0
            self._parts[rank] = (e_start, e_hi - e_lo, t_start, t_hi - t_lo)
        return self._parts[rank]

    def _all(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Per document: the contiguous local (start, length) of everything ``rank`` holds of it."""
        e_start, e_len, t_start, t_len = self.rank_parts(rank)
        return np.where(e_len > 0, e_start, t_start), e_len + t_len

    def local_real(self, rank: int) -> np.ndarray:
        """Real tokens of every document on ``rank``."""
        return self._all(rank)[1]

    def ring_block(self, rank: int, src: int) -> VarlenBlock:
        """Queries of ``rank`` vs the keys that ``src`` holds (ring step (rank - src) mod CP).

        Per document: src == rank: causal over the rank's contiguous part; src < rank: all of
        the rank's queries vs src's early part (chunk src precedes both of rank's chunks); src >
        rank: rank's late queries vs all of src's keys (both of src's chunks precede chunk
        2 CP - 1 - rank).
        """
        key = (rank, src)
        if key not in self._blocks:
            t = self.local_tokens
            q_start, q_len = self._all(rank)
            if src == rank:
                block = VarlenBlock(q_start, q_len, q_start, q_len, True, t, t)
            elif src < rank:
                k_start, k_len, _, _ = self.rank_parts(src)
                block = VarlenBlock(q_start, q_len, k_start, k_len, False, t, t)
            else:
                _, _, late_start, late_len = self.rank_parts(rank)
                k_start, k_len = self._all(src)
                block = VarlenBlock(late_start, late_len, k_start, k_len, False, t, t)
            self._blocks[key] = block
        return self._blocks[key]

    def gathered_order(self) -> np.ndarray:
        """Permutation p with gathered[p] in position order.

        ``gathered`` is every rank's local tensor concatenated in rank order (the all-to-all
        result); gathered[p] is the CP 1 layout, where unit i occupies
        ``[cu_padded[i], cu_padded[i + 1])``.
        """
        cp, t = self.cp_size, self.local_tokens
        j = np.arange(num_chunks(cp))
        owner = chunk_owner(j, cp)  # chunk j of every unit, as gathered rows: unit-major
        after_early = np.where(j < cp, 0, self.sizes[:, owner])  # a late chunk follows the early
        starts = owner * t + self.local_start[:, owner] + after_early
        return _ranges(starts.reshape(-1), self.sizes.reshape(-1))

    def plan_device(self, device, rank: int) -> None:
        """Puts on ``device`` the index tensors of every block ``rank`` may run (the ring's CP
        blocks, the all-to-all's document block and gathered order): built on the host, packed
        into one int64 and one int32 buffer (pinned on CUDA), copied once each without blocking,
        and handed out as views. Without it the first layer copies them one by one, synchronously.
        """
        device = torch.device(device)
        blocks = [self.ring_block(rank, src) for src in range(self.cp_size)]
        blocks.append(self.document_block())
        order = self.gathered_order().astype(np.int64)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        arrays = [b.host_arrays() for b in blocks]
        parts64 = [a[n] for a in arrays for n in ("q_rows", "k_rows")] + [order, inverse]
        parts32 = [a[n] for a in arrays for n in ("cu_q", "cu_k")]
        views64 = _one_copy(parts64, torch.int64, device)
        views32 = _one_copy(parts32, torch.int32, device)
        for i, block in enumerate(blocks):
            block._device_cache.setdefault(
                str(device),
                {
                    "q_rows": views64[2 * i],
                    "k_rows": views64[2 * i + 1],
                    "cu_q": views32[2 * i],
                    "cu_k": views32[2 * i + 1],
                },
            )
        self._blocks.setdefault(("order", str(device)), (views64[-2], views64[-1]))

    def document_block(self) -> VarlenBlock:
        """The causal per-document block of the whole sequence in position order (CP 1 layout)."""
        if (-1, -1) not in self._blocks:
            start, total = self.doc_start, int(self.cu_padded[-1])
            length = self.doc_end - self.doc_start
            self._blocks[(-1, -1)] = VarlenBlock(start, length, start, length, True, total, total)
        return self._blocks[(-1, -1)]


def _one_copy(parts: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> list:
    """``parts`` concatenated on the host (pinned for CUDA), copied to ``device`` once without
    blocking; returns one view per part."""
    host = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0)).to(dtype)
    if device.type == "cuda" and torch.cuda.is_available():  # no pinned memory without a driver
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    views, start = [], 0
    for part in parts:
        views.append(flat.narrow(0, start, part.size))
        start += part.size
    return views
