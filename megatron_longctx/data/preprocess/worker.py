"""The tokenizing half of the pipeline: raw JSONL lines in, flat token arrays out.

Runs in worker processes (or in-process with one worker). Each worker loads the tokenizer once, in
``init_worker``; ``tokenize_batch`` (a batch of short records) and ``tokenize_piece`` (one piece of
a long document, cut by the parent at a safe boundary, see ``split.py``) are pure functions of their
input, so the output does not depend on how tasks are spread over workers.
"""

from __future__ import annotations

import itertools
import os
import signal
from dataclasses import dataclass, field

import numpy as np

from megatron_longctx.data.preprocess.readers import BadRecord, check_encodable, parse_record
from megatron_longctx.data.preprocess.tokenizer import load_tokenizer

# (file index, line number, raw line)
RawLine = tuple[int, int, bytes]


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs to tokenize a batch.

    Args:
        tokenizer_type: Megatron tokenizer type name.
        tokenizer_model: local tokenizer path.
        json_keys: keys tokenized from every record.
        append_eod: append ``eod_id`` to every document.
        dtype: token dtype of the output (numpy dtype name).
        eod_id: the separator (``tokenizer.resolve_eod``); None: the tokenizer's EOD id.
    """

    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple[str, ...]
    append_eod: bool
    dtype: str
    eod_id: int | None = None


@dataclass
class BatchResult:
    """Tokens of the good records of one batch, per key, plus the bad records.

    Attributes:
        tokens: per key, the concatenated tokens of the good records, in input order.
        lengths: per key, int32 token count of each good record.
        bad: ``(file index, line number, reason, detail)`` per rejected record, in input order.
        num_blank: blank lines seen (ignored, not errors).
        num_bytes: raw bytes of the batch.
    """

    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    bad: list[tuple[int, int, str, str]] = field(default_factory=list)
    num_blank: int = 0
    num_bytes: int = 0


_STATE: dict = {}


def init_worker(settings: WorkerSettings, in_child: bool = True, tokenizer=None) -> None:
    """Sets this process up to run tasks (pool initializer).

    Args:
        settings: what every task needs.
        in_child: True in a pool worker (signals are left to the parent).
        tokenizer: the parent's loaded tokenizer, reused instead of loading the model again: passed
            in-process with one worker, or inherited through ``fork`` (not pickled), so the workers
            start encoding at once instead of each re-reading the model (~0.5 s for Llama 3's).
            ``None`` (``spawn``): load it here.
    """
    if in_child:
        # The parent owns interruption: it aborts the outputs and terminates the pool.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # see below; never touch the caller's env
    _STATE["settings"] = settings
    if tokenizer is None:
        tokenizer = load_tokenizer(settings.tokenizer_type, settings.tokenizer_model)
    # One encoding thread per worker, so --workers N means N cores: the pool fills the cores, and
    # extra tokenizer threads only oversubscribe them (and make timings erratic on shared machines).
    if hasattr(tokenizer, "num_threads"):
        tokenizer.num_threads = 1
    _STATE["tokenizer"] = tokenizer
    _STATE["dtype"] = np.dtype(settings.dtype)
    if settings.append_eod and settings.eod_id is None and tokenizer.eod_id is None:
        raise ValueError(
            f"--append-eod was given but tokenizer {settings.tokenizer_model} defines no EOS/EOD "
            "token: train it with an eos piece or drop --append-eod"
        )


def tokenize_batch(batch: list[RawLine]) -> BatchResult:
    """Validates and tokenizes one batch of raw lines (see ``BatchResult``)."""
    settings: WorkerSettings = _STATE["settings"]
    tokenizer = _STATE["tokenizer"]
    dtype = _STATE["dtype"]
    keys = settings.json_keys
    result = BatchResult(num_bytes=sum(len(line) for _, _, line in batch))
    texts: list[list[str]] = [[] for _ in keys]
    origins: list[tuple[int, int]] = []
    for file_index, line_number, line in batch:
        try:
            record = parse_record(line, list(keys))
        except BadRecord as e:
            result.bad.append((file_index, line_number, e.reason, e.detail))
            continue
        if record is None:
            result.num_blank += 1
            continue
        for column, text in zip(texts, record, strict=True):
            column.append(text)
        origins.append((file_index, line_number))

    encoded = [
        _encode_column(tokenizer, key, column) for key, column in zip(keys, texts, strict=True)
    ]
    # A record is dropped for every key (keeping keys aligned) if any of its texts failed.
    failed: dict[int, tuple[str, str]] = {}
    for column in encoded:
        for i, ids in enumerate(column):
            if isinstance(ids, BadRecord) and i not in failed:
                failed[i] = (ids.reason, ids.detail)
    if failed:
        for i in sorted(failed):
            result.bad.append((*origins[i], *failed[i]))
        result.bad.sort(key=lambda b: (b[0], b[1]))

    eod_id = settings.eod_id if settings.eod_id is not None else tokenizer.eod_id
    eod = [eod_id] if settings.append_eod else []
    for key, column in zip(keys, encoded, strict=True):
        docs = [ids + eod if eod else ids for i, ids in enumerate(column) if i not in failed]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int32, count=len(docs))
        total = int(lengths.sum(dtype=np.int64))
        result.tokens[key] = np.fromiter(
            itertools.chain.from_iterable(docs), dtype=dtype, count=total
        )
        result.lengths[key] = lengths
    return result


def tokenize_piece(text: str) -> np.ndarray:
    """Tokens of one piece of a long document (validated by the parent; no EOD)."""
    return np.array(_STATE["tokenizer"].encode(text), dtype=_STATE["dtype"])


def run_task(task: tuple[str, object]) -> BatchResult | np.ndarray:
    """Runs one task: ``("batch", raw lines)`` -> ``BatchResult``, ``("piece", text)`` -> tokens."""
    kind, payload = task
    return tokenize_batch(payload) if kind == "batch" else tokenize_piece(payload)


def _encode_column(tokenizer, key: str, texts: list[str]) -> list:
    """Encodes texts in one call; on failure, one by one to pin the offending record."""
    if not texts:
        return []
    try:
        return tokenizer.encode_batch(texts)
    except (UnicodeError, RuntimeError, TypeError, ValueError):
        out: list = []
        for text in texts:
            try:
                check_encodable(text, key)
                out.append(tokenizer.encode(text))
            except BadRecord as e:
                out.append(e)
        return out
