"""Scoring requests -> packed, document-masked sequences (the in-process evaluation's batches).

A request is one document: the context followed by the tokens to score. Several requests share a
sequence of at most ``capacity`` tokens (first-fit, longest first), each its own document in
``cu_seqlens``, so attention never crosses them and a short prompt stays cheap at a long stage.
The packed micro-batch has the loader's keys (``tokens``, ``labels``, ``loss_mask``,
``position_ids``, ``cu_seqlens``: ``[1, P]``), so the trainer's own batch path
(``training/batch.py``) shards it for CP / SP exactly like a training batch.

``position_ids`` hold the token's index in the packed sequence (not reset per document, as in
the loader; megatron's THD RoPE restarts per document from ``cu_seqlens`` itself). After CP
sharding they tell each rank which packed tokens it holds; ``Pack.request`` / ``Pack.slot`` map a
packed index to (request, scored-token number), -1 where nothing is scored.

Position legend: a request ``tokens[0..n)`` with ``score_start = k`` scores targets
``tokens[k..n)``; the prediction of ``tokens[j]`` is made at position ``j - 1``, so slot
``j - k`` sits at packed index ``offset + j - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ScoreRequest:
    """One document to score.

    Attributes:
        tokens: context + scored tokens.
        score_start: index of the first scored token (>= 1).
        per_position: also accumulate this request's losses by scored-token number (the loss by
            position analysis).
    """

    tokens: list[int]
    score_start: int
    per_position: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.score_start <= len(self.tokens):
            raise ValueError(
                f"score_start {self.score_start} must lie in [1, {len(self.tokens)}] "
                "(a scored token needs a token before it)"
            )

    @property
    def num_scored(self) -> int:
        return len(self.tokens) - self.score_start


@dataclass
class Pack:
    """One packed sequence and its map back to the requests.

    Attributes:
        micro: the loader-style micro-batch (CPU tensors, ``[1, P]``).
        request: ``[P]`` request id scored at each packed position (-1: none).
        slot: ``[P]`` scored-token number inside a ``per_position`` request (-1: none).
    """

    micro: dict
    request: np.ndarray
    slot: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.micro["tokens"].shape[1])


def plan_packs(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: request ids per pack, each pack's total <= ``capacity``.

    Raises:
        ValueError: a request is longer than ``capacity``.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(
            f"a scoring request of {max(too_long)} tokens does not fit the sequence length "
            f"{capacity}; lower the evaluation lengths to at most the stage's seq_length"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(capacity - lengths[i])
    return [sorted(p) for p in packs]


def build_pack(requests: list[ScoreRequest], ids: list[int]) -> Pack:
    """The micro-batch of the requests ``ids``, back to back in that order."""
    total = sum(len(requests[i].tokens) for i in ids)
    tokens = np.zeros(total, dtype=np.int64)
    labels = np.zeros(total, dtype=np.int64)
    mask = np.zeros(total, dtype=np.float32)
    req = np.full(total, -1, dtype=np.int64)
    slot = np.full(total, -1, dtype=np.int64)
    cu, off = [0], 0
    for i in ids:
        r = requests[i]
        n = len(r.tokens)
        t = np.asarray(r.tokens, dtype=np.int64)
        tokens[off : off + n] = t
        labels[off : off + n - 1] = t[1:]
        at = np.arange(off + r.score_start - 1, off + n - 1)
        mask[at] = 1.0
        req[at] = i
        if r.per_position:
            slot[at] = np.arange(r.num_scored)
        off += n
        cu.append(off)
    micro = {
        "tokens": torch.from_numpy(tokens)[None],
        "labels": torch.from_numpy(labels)[None],
        "loss_mask": torch.from_numpy(mask)[None],
        "position_ids": torch.arange(total)[None],
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }
    return Pack(micro, req, slot)


def pack_requests(requests: list[ScoreRequest], capacity: int) -> list[Pack]:
    """All requests packed into sequences of at most ``capacity`` tokens."""
    plan = plan_packs([len(r.tokens) for r in requests], capacity)
    return [build_pack(requests, ids) for ids in plan]


def filler_pack(num_tokens: int) -> Pack:
    """A pack that scores nothing (evens the number of forwards across DP ranks)."""
    return build_pack([ScoreRequest([0] * num_tokens, num_tokens)], [0])
