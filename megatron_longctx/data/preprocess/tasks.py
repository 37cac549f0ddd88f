"""The reading half of the pipeline: input lines -> tasks for the tokenizing workers, in order.

Short records are grouped into ``("batch", raw lines)`` tasks of about ``batch_bytes``; the workers
parse and validate them. A record whose line is longer than ``max_piece_chars`` is parsed here
instead, and each text longer than that is cut at safe boundaries (``split.py``) into
``("piece", text)`` tasks, so one long document is encoded by all workers at once and no worker
ever encodes more than about ``max_piece_chars`` characters in one call. Each task comes with its
metadata for the writer: ``None`` for a batch, ``(key index, last piece?)`` for a piece. A long
record that fails validation, or one for a tokenizer without a known safe boundary, goes into a
batch as it is (same errors, whole-document encoding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_longctx.data.preprocess.readers import (
    BadRecord,
    check_encodable,
    iter_lines,
    parse_record,
)
from megatron_longctx.data.preprocess.split import Splitter

logger = logging.getLogger(__name__)

Task = tuple[str, object]  # ("batch", list[RawLine]) or ("piece", str)
TaskMeta = tuple[int, bool] | None


@dataclass
class SplitCounts:
    """How long records were handled (reported in the run summary and the stats sidecar).

    Attributes:
        documents: records encoded in more than one piece.
        pieces: pieces those records were cut into (over all keys).
        unsplit: records longer than the piece size encoded whole (no safe boundary known).
        oversized: pieces longer than the piece size (a stretch without any safe cut).
    """

    documents: int = 0
    pieces: int = 0
    unsplit: int = 0
    oversized: int = 0


def iter_tasks(
    files: list[str],
    json_keys: list[str],
    batch_bytes: int,
    max_piece_chars: int,
    splitter: Splitter | None,
    no_split_reason: str,
    progress,
    counts: SplitCounts,
) -> Iterator[tuple[TaskMeta, Task]]:
    """Yields ``(meta, task)`` in input order (see the module docstring).

    Args:
        files: input files, in order.
        json_keys: keys tokenized from each record.
        batch_bytes: raw bytes per batch of short records.
        max_piece_chars: longest text encoded in one tokenizer call where a safe cut allows it.
        splitter: safe cuts for the tokenizer, or ``None`` (long records are encoded whole).
        no_split_reason: why ``splitter`` is ``None`` (logged once).
        progress: gets ``read_bytes`` updates.
        counts: updated with the split statistics.
    """
    batch: list = []
    size = 0
    done_bytes = 0
    for file_index, path in enumerate(files):
        for line_number, line, position in iter_lines(path):
            progress.read_bytes = done_bytes + position
            texts = None
            if len(line) > max_piece_chars:
                texts = _long_texts(line, json_keys, max_piece_chars, splitter)
                if texts is None and splitter is None:
                    if not counts.unsplit:
                        logger.warning(
                            "%s:%d (%d bytes) is longer than --max-piece-chars %d but is encoded "
                            "whole, as are all such records: %s; worker memory grows with the "
                            "longest one",
                            path,
                            line_number,
                            len(line),
                            max_piece_chars,
                            no_split_reason,
                        )
                    counts.unsplit += 1
            if texts is None:
                batch.append((file_index, line_number, line))
                size += len(line)
                if size >= batch_bytes:
                    yield None, ("batch", batch)
                    batch, size = [], 0
                continue
            if batch:
                yield None, ("batch", batch)
                batch, size = [], 0
            del line
            num_pieces = 0
            for key_index, text in enumerate(texts):
                pieces = splitter.pieces(text, max_piece_chars)
                piece = next(pieces)
                for following in pieces:  # one ahead, to flag the last piece
                    _check_size(piece, max_piece_chars, path, line_number, counts)
                    yield (key_index, False), ("piece", piece)
                    num_pieces += 1
                    piece = following
                _check_size(piece, max_piece_chars, path, line_number, counts)
                yield (key_index, True), ("piece", piece)
                num_pieces += 1
            if num_pieces > len(texts):
                counts.documents += 1
                counts.pieces += num_pieces
        done_bytes += _size(path)
    if batch:
        yield None, ("batch", batch)


def _check_size(piece: str, max_piece_chars: int, path: str, line: int, counts: SplitCounts):
    if len(piece) <= max_piece_chars:
        return
    if not counts.oversized:
        logger.warning(
            "%s:%d has %d characters without a safe cut (--max-piece-chars %d): encoded as one "
            "piece; later such pieces are only counted",
            path,
            line,
            len(piece),
            max_piece_chars,
        )
    counts.oversized += 1


def _long_texts(
    line: bytes, json_keys: list[str], max_piece_chars: int, splitter: Splitter | None
) -> list[str] | None:
    """The record's texts when at least one must be split, else ``None`` (handle as a batch)."""
    if splitter is None:
        return None
    try:
        texts = parse_record(line, json_keys)
        if texts is None:
            return None
        for key, text in zip(json_keys, texts, strict=True):
            check_encodable(text, key)
    except BadRecord:  # the worker reports it, in order, with the same message
        return None
    if all(len(t) <= max_piece_chars for t in texts):
        return None
    return texts


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0  # 0 for pipes: no ETA
