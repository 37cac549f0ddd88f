"""Streaming, atomic writer of Megatron-Core's indexed dataset format (``.bin`` + ``.idx``).

Byte layout, identical to ``megatron.core.datasets.indexed_dataset._IndexWriter`` (one sequence per
document, no sequence modes):

    .bin: the tokens of every document, back to back, in the token dtype.
    .idx: b"MMIDIDX\\x00\\x00" | uint64 version=1 | uint8 dtype code (8 = uint16, 4 = int32)
          | uint64 sequence count N | uint64 document count N+1
          | int32 lengths[N] | int64 byte pointers[N] | int64 document indices [0, 1, ..., N]

Memory stays flat however large the corpus: tokens go straight to the ``.bin`` and document lengths
are spilled to a temporary file; the ``.idx`` is assembled from that file in fixed-size chunks at
the end. Everything is written under temporary names; ``commit`` renames the ``.bin`` first and the
``.idx`` last, so a final-named ``.idx`` always describes a complete ``.bin``.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np

logger = logging.getLogger(__name__)

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
_CHUNK = 1 << 20  # documents per chunk when assembling the .idx


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else int32 (e.g. Llama 3's 128,256)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def temp_path(final_path: str) -> str:
    """The temporary name a final path is written under (same directory, so rename is atomic)."""
    directory, name = os.path.split(final_path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


class IndexedDatasetWriter:
    """Appends documents to ``{path_prefix}.bin`` and writes ``{path_prefix}.idx`` on ``finalize``.

    Args:
        path_prefix: output prefix; Megatron reads it back with ``IndexedDataset(path_prefix)``.
        dtype: token dtype, ``np.uint16`` or ``np.int32``.
    """

    def __init__(self, path_prefix: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"token dtype must be uint16 or int32, got {self.dtype}")
        self.bin_path = path_prefix + ".bin"
        self.idx_path = path_prefix + ".idx"
        self._tmp_bin = temp_path(self.bin_path)
        self._tmp_idx = temp_path(self.idx_path)
        self._tmp_lengths = temp_path(path_prefix + ".lengths")
        self._bin = open(self._tmp_bin, "wb", buffering=1 << 22)
        self._lengths = open(self._tmp_lengths, "wb", buffering=1 << 20)
        self.num_documents = 0
        self.num_tokens = 0
        self._open_tokens = 0  # tokens of the document being appended piece by piece
        self._finalized = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as one flat token array and their lengths.

        Args:
            tokens: concatenated token ids of the documents, already in ``dtype``.
            lengths: int32 number of tokens of each document; must sum to ``len(tokens)``.
        """
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, writer expects {self.dtype}")
        if self._open_tokens:
            raise RuntimeError("add_documents() while a document is open: call end_document()")
        if int(lengths.sum()) != tokens.size:
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given"
            )
        self._bin.write(_buffer(tokens))
        self._lengths.write(_buffer(np.asarray(lengths, dtype=np.int32)))
        self.num_documents += int(lengths.size)
        self.num_tokens += int(tokens.size)

    def append_tokens(self, tokens: np.ndarray) -> None:
        """Appends tokens to the open document (one piece of a long document; streamed, so a long
        document's tokens are never held whole). ``end_document`` closes it."""
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, writer expects {self.dtype}")
        self._bin.write(_buffer(tokens))
        self._open_tokens += int(tokens.size)
        self.num_tokens += int(tokens.size)

    def end_document(self) -> None:
        """Closes the document built by ``append_tokens`` calls."""
        if self._open_tokens > np.iinfo(np.int32).max:
            raise ValueError(
                f"a document of {self._open_tokens:,} tokens does not fit the .idx format's int32 "
                "length: split the document before preprocessing"
            )
        self._lengths.write(np.int32(self._open_tokens).tobytes())
        self.num_documents += 1
        self._open_tokens = 0

    def lengths(self) -> np.ndarray:
        """Document lengths written so far, memory-mapped from the spill file (call after
        finalize)."""
        if self.num_documents == 0:
            return np.zeros(0, dtype=np.int32)
        return np.memmap(self._tmp_lengths, dtype=np.int32, mode="r", shape=(self.num_documents,))

    def finalize(self) -> None:
        """Closes the ``.bin`` and writes the ``.idx`` (still under temporary names)."""
        if self._open_tokens:
            raise RuntimeError("finalize() while a document is open: call end_document()")
        self._bin.close()
        self._lengths.close()
        n = self.num_documents
        itemsize = self.dtype.itemsize
        with open(self._tmp_idx, "wb") as idx, open(self._tmp_lengths, "rb") as spill:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n))
            idx.write(struct.pack("<Q", n + 1))
            for _ in range(0, n, _CHUNK):  # lengths, copied as they are
                idx.write(spill.read(_CHUNK * 4))
            spill.seek(0)
            offset = 0
            for _ in range(0, n, _CHUNK):  # pointers: exclusive cumulative sum in bytes
                chunk = np.frombuffer(spill.read(_CHUNK * 4), dtype=np.int32).astype(np.int64)
                ends = np.cumsum(chunk) * itemsize + offset
                idx.write((ends - chunk * itemsize).tobytes())
                offset = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):  # document i is sequence i
                idx.write(np.arange(start, min(start + _CHUNK, n + 1), dtype=np.int64).tobytes())
        self._finalized = True

    def commit(self) -> None:
        """Renames the finished files to their final names (``.bin`` first, ``.idx`` last)."""
        if not self._finalized:
            raise RuntimeError("commit() before finalize(): the .idx has not been written")
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self.discard_spill()

    def discard_spill(self) -> None:
        """Deletes the temporary lengths file."""
        _remove(self._tmp_lengths)

    def abort(self) -> None:
        """Closes and deletes every temporary file; final-named files are left untouched."""
        for f in (self._bin, self._lengths):
            try:
                f.close()
            except OSError:
                pass
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths):
            _remove(path)


def _buffer(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy (``tobytes`` would copy every token once more)."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
