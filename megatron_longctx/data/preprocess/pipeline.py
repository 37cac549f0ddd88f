"""JSONL -> Megatron indexed datasets: parallel tokenization with one ordered writer.

Shape of the pipeline:

    parent: read raw lines -> tasks (tasks.py) ──> worker pool: parse, validate, tokenize
              short records: batches of <= batch_bytes
              long records:  pieces of <= max_piece_chars, cut at safe boundaries (split.py)
    parent: <── results taken back strictly in submission order ──> IndexedDatasetWriter per key
              (a long document's pieces are appended as they come: its tokens are never held whole)

At most ``2 x workers + 2`` tasks are in flight, so memory is bounded by the batch and piece sizes,
not the corpus or the longest document; the output is byte-identical for any number of workers (and
to whole-document encoding) because results are consumed in input order and the pieces' encodings
concatenate to the whole document's. With ``--on-error fail`` the first bad record (in input order)
aborts the run and every temporary file is deleted; nothing is renamed to a final name until all
outputs are complete.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

import numpy as np

from megatron_longctx.data.preprocess import stats as stats_lib
from megatron_longctx.data.preprocess.progress import Progress
from megatron_longctx.data.preprocess.readers import EMPTY_TEXT, REASONS, expand_inputs
from megatron_longctx.data.preprocess.split import make_splitter
from megatron_longctx.data.preprocess.tasks import SplitCounts, iter_tasks
from megatron_longctx.data.preprocess.tokenizer import (
    TOKENIZER_TYPES,
    load_tokenizer,
    resolve_eod,
)
from megatron_longctx.data.preprocess.worker import WorkerSettings, init_worker, run_task
from megatron_longctx.data.preprocess.writer import IndexedDatasetWriter, token_dtype

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")
_MAX_LOGGED_SKIPS = 10


class PreprocessError(RuntimeError):
    """A bad record under ``--on-error fail``, or a run that produced no documents."""


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (Megatron-LM's ``preprocess_data.py`` names).

    Args:
        input: file, glob or directory (or a list of them) of ``.jsonl`` / ``.jsonl.gz``.
        output_prefix: outputs are ``{output_prefix}_{key}_document.bin/.idx`` and ``_stats.json``.
        tokenizer_type: ``SentencePieceTokenizer`` or ``HuggingFaceTokenizer``.
        tokenizer_model: local tokenizer file or directory.
        json_keys: JSON keys to tokenize; one output dataset per key.
        append_eod: append the document separator after every document.
        eod_token: the separator (a token or an id); None: the tokenizer's end-of-text token
            (``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``) when it has one, else
            its EOS (``tokenizer.resolve_eod``). Needs ``append_eod``.
        workers: tokenizing processes (1 = in-process).
        log_interval: documents between progress updates.
        on_error: ``fail`` (abort, leave nothing) or ``skip`` (count bad records and go on).
            Either way a record whose text is empty (``""``) is skipped, counted under
            ``empty_text`` and warned about, as real corpora hold them (Megatron-LM keeps going
            too); whitespace-only text is tokenized like any other.
        quiet: no progress output even on a TTY.
        plot: also write ``{output_prefix}_{key}_length_hist.png``.
        batch_bytes: raw bytes per batch of short records sent to a worker.
        max_piece_chars: most characters one tokenizer call encodes: a longer document is encoded
            in pieces cut where the tokens provably do not change (``split.py``), spread over all
            workers. Bounds each worker's memory whatever the longest document (the tokenizer's
            working memory grows with the text of one call; Hugging Face tokenizers hold ~600
            bytes per token). The default keeps a worker well under 1 GB, so 64 workers fit a
            512 GB node many times over.
    """

    input: str | list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    eod_token: str | None = None
    workers: int = 1
    log_interval: int = 1000
    on_error: str = "fail"
    quiet: bool = False
    plot: bool = False
    batch_bytes: int = 1 << 19
    max_piece_chars: int = 1 << 18

    def __post_init__(self) -> None:
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"--tokenizer-type {self.tokenizer_type!r} is not supported: use one of "
                f"{', '.join(TOKENIZER_TYPES)}"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"--on-error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.eod_token is not None and not self.append_eod:
            raise ValueError(f"--eod-token {self.eod_token} needs --append-eod")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.max_piece_chars < 1 or self.batch_bytes < 1:
            raise ValueError(
                f"--max-piece-chars and batch_bytes must be >= 1, got {self.max_piece_chars} and "
                f"{self.batch_bytes}"
            )
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys must be non-empty and distinct, got {self.json_keys}")
        if not self.output_prefix or self.output_prefix.endswith(os.sep):
            raise ValueError(
                f"--output-prefix {self.output_prefix!r} must name a file prefix, e.g. data/corpus"
            )


@dataclass
class PreprocessReport:
    """What a run produced (also what the CLI prints)."""

    outputs: dict[str, dict[str, str]]
    stats: dict[str, dict]
    skipped: dict[str, int]
    num_blank_lines: int
    seconds: float
    split: SplitCounts = field(default_factory=SplitCounts)
    split_method: str = ""

    @property
    def num_tokens(self) -> int:
        """Tokens written over all keys."""
        return sum(s["tokens"] for s in self.stats.values())


def output_paths(output_prefix: str, key: str) -> dict[str, str]:
    """Final paths for one key, named as Megatron-LM names them."""
    base = f"{output_prefix}_{key}"
    return {
        "prefix": f"{base}_document",
        "bin": f"{base}_document.bin",
        "idx": f"{base}_document.idx",
        "stats": f"{base}_stats.json",
        "plot": f"{base}_length_hist.png",
    }


def _ordered_results(tasks, settings: WorkerSettings, workers: int, tokenizer):
    """Yields ``(meta, run_task(task))`` in input order, a bounded number of tasks in flight.

    One worker runs the tasks in this process (no pool, no pickling: the cheapest one-core path).
    More workers fork from this process after ``tokenizer`` is loaded and inherit it.
    """
    if workers == 1:
        init_worker(settings, in_child=False, tokenizer=tokenizer)
        for meta, task in tasks:
            yield meta, run_task(task)
        return
    fork = "fork" in mp.get_all_start_methods()
    initargs = (settings, True, tokenizer if fork else None)  # fork: inherited, never pickled
    pool = mp.get_context("fork" if fork else "spawn").Pool(
        workers, initializer=init_worker, initargs=initargs
    )
    try:
        pending: collections.deque = collections.deque()
        for meta, task in tasks:
            pending.append((meta, pool.apply_async(run_task, (task,))))
            if len(pending) >= 2 * workers + 2:
                meta, result = pending.popleft()
                yield meta, result.get()
        while pending:
            meta, result = pending.popleft()
            yield meta, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def preprocess(config: PreprocessConfig) -> PreprocessReport:
    """Runs the whole pipeline (see the module docstring) and returns what it wrote.

    Raises:
        PreprocessError: a bad record with ``on_error="fail"`` (the message reads
            ``file:line: reason: detail``), or no document survived.
        FileNotFoundError / ValueError: bad inputs, tokenizer or flags.
    """
    start = time.perf_counter()
    files = expand_inputs(config.input)
    tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model)
    eod_id, eod_token = (None, None)
    if config.append_eod:  # the document separator: --eod-token, else the end-of-text token
        eod_id, eod_token = resolve_eod(tokenizer, config.eod_token)
    dtype = token_dtype(tokenizer.vocab_size)
    settings = WorkerSettings(
        config.tokenizer_type,
        config.tokenizer_model,
        tuple(config.json_keys),
        config.append_eod,
        dtype.name,
        eod_id,
    )
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: output_paths(config.output_prefix, key) for key in config.json_keys}
    total_bytes = sum(_size(p) for p in files)
    progress = Progress(total_bytes, config.log_interval, enabled=not config.quiet)
    splitter, split_method = make_splitter(tokenizer)
    counts = SplitCounts()
    tasks = iter_tasks(
        files,
        config.json_keys,
        config.batch_bytes,
        config.max_piece_chars,
        splitter,
        split_method,
        progress,
        counts,
    )
    eod = np.array([eod_id] if config.append_eod else [], dtype=dtype)

    writers: dict[str, IndexedDatasetWriter] = {}
    temp_files: list[str] = []
    skipped = dict.fromkeys(REASONS, 0)
    num_blank = 0
    try:
        for key in config.json_keys:
            writers[key] = IndexedDatasetWriter(paths[key]["prefix"], dtype)
        first = writers[config.json_keys[0]]
        for meta, result in _ordered_results(tasks, settings, config.workers, tokenizer):
            if meta is not None:  # one piece of a long document
                key_index, last = meta
                writer = writers[config.json_keys[key_index]]
                writer.append_tokens(result)
                if last:
                    writer.append_tokens(eod)
                    writer.end_document()
                progress.update(first.num_documents, first.num_tokens, counts.documents)
                continue
            for file_index, line_number, reason, detail in result.bad:
                where = f"{files[file_index]}:{line_number}"
                if config.on_error == "fail" and reason != EMPTY_TEXT:  # empties: skip, count
                    raise PreprocessError(
                        f"{where}: {reason}: {detail} (fix the record, or pass --on-error skip to "
                        "count and skip bad records)"
                    )
                skipped[reason] += 1
                if sum(skipped.values()) <= _MAX_LOGGED_SKIPS:
                    logger.warning("skipping %s: %s: %s", where, reason, detail)
            num_blank += result.num_blank
            for key, writer in writers.items():
                writer.add_documents(result.tokens[key], result.lengths[key])
            progress.update(first.num_documents, first.num_tokens, counts.documents)
        progress.close()
        if first.num_documents == 0:
            raise PreprocessError(
                f"no documents were written from {len(files)} input file(s) "
                f"(skipped: {_format_counts(skipped)}); check --json-keys and the input files"
            )
        all_stats = {}
        for key, writer in writers.items():
            writer.finalize()
            summary = stats_lib.summarize_lengths(writer.lengths())
            all_stats[key] = _stats_payload(
                config, key, files, dtype, summary, skipped, num_blank, tokenizer.vocab_size
            )
            all_stats[key].update(eod_token=eod_token, eod_id=eod_id)
            all_stats[key]["split_documents"] = counts.documents
            temp_files.append(stats_lib.write_json_atomic(paths[key]["stats"], all_stats[key]))
            if config.plot:
                temp_files.append(
                    stats_lib.plot_histogram(
                        summary["length_histogram"],
                        f"{config.output_prefix} [{key}]",
                        paths[key]["plot"],
                    )
                )
    except BaseException:
        for writer in writers.values():
            writer.abort()
        for tmp in temp_files:
            stats_lib.remove_quietly(tmp)
        progress.close()
        raise
    # Commit: sidecars first, each .idx last so a final-named .idx means a complete dataset.
    for tmp in temp_files:
        directory, name = os.path.split(tmp)
        os.replace(tmp, os.path.join(directory, name[1:].rsplit(".tmp-", 1)[0]))
    for writer in writers.values():
        writer.commit()
    seconds = time.perf_counter() - start
    return PreprocessReport(paths, all_stats, skipped, num_blank, seconds, counts, split_method)


def _stats_payload(
    config: PreprocessConfig,
    key: str,
    files: list[str],
    dtype: np.dtype,
    summary: dict,
    skipped: dict[str, int],
    num_blank: int,
    vocab_size: int,
) -> dict:
    return {
        "key": key,
        **summary,
        "skipped": dict(skipped),
        "skipped_total": sum(skipped.values()),
        "blank_lines": num_blank,
        "append_eod": config.append_eod,
        "dtype": dtype.name,
        "tokenizer_type": config.tokenizer_type,
        "tokenizer_model": os.path.abspath(config.tokenizer_model),
        "vocab_size": vocab_size,
        "inputs": [os.path.abspath(p) for p in files],
    }


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0  # 0 for pipes: no ETA


def _format_counts(counts: dict[str, int]) -> str:
    parts = [f"{k}={v}" for k, v in counts.items() if v]
    return ", ".join(parts) or "none"
