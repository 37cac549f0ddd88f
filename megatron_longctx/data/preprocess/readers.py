"""Input expansion and record validation for JSONL corpora.

Reading happens in the parent process (raw bytes, cheap); decoding and validation happen in the
tokenizing workers through ``parse_record`` so that the expensive part runs in parallel.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz")

# Reasons a record is rejected; keys of the ``skipped`` counts in the stats sidecar.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NOT_A_STRING = "not_a_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
REASONS = (MALFORMED_JSON, NOT_AN_OBJECT, MISSING_KEY, NOT_A_STRING, INVALID_UTF8, EMPTY_TEXT)


class BadRecord(ValueError):
    """A record that cannot be tokenized.

    Args:
        reason: one of ``REASONS``.
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def expand_inputs(spec: str | list[str]) -> list[str]:
    """Resolves ``--input`` (files, globs or directories) into a sorted, de-duplicated file list.

    Directories are searched recursively for ``.jsonl`` and ``.jsonl.gz`` files.

    Args:
        spec: one path/glob or a list of them.

    Returns:
        Input files in a stable order (sorted within each spec, specs in the given order).

    Raises:
        FileNotFoundError: a spec matches nothing, or a directory holds no JSONL files.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for item in specs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if name.endswith(INPUT_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(
                    f"--input directory {item} holds no .jsonl or .jsonl.gz files "
                    "(searched recursively)"
                )
        elif os.path.exists(item):  # a file, or a named pipe fed by another process
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(
                    f"--input {item!r} matches no file: pass a .jsonl/.jsonl.gz file, a glob "
                    "(quote it) or a directory"
                )
        files.extend(p for p in found if p not in files)
    return files


def open_binary(path: str):
    """Opens a JSONL file for binary line reading, transparently gunzipping ``.gz``."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def iter_lines(path: str) -> Iterator[tuple[int, bytes, int]]:
    """Yields ``(line_number, raw_line, compressed_bytes_read_so_far)`` for each line (1-based).

    The byte position drives the progress ETA; for ``.gz`` it is the compressed position.
    """
    with open_binary(path) as f:
        raw = getattr(f, "fileobj", None)  # gzip: the underlying compressed file
        if raw is not None and not raw.seekable():
            raw = None
        compressed = path.endswith(".gz")
        position = 0
        for line_number, line in enumerate(f, start=1):
            if compressed:
                position = raw.tell() if raw is not None else 0
            else:
                position += len(line)  # counted, not tell(): inputs may be pipes
            yield line_number, line, position


def parse_record(line: bytes, json_keys: list[str]) -> list[str] | None:
    """Decodes one JSONL line and returns the texts under ``json_keys``.

    Args:
        line: the raw line, newline included.
        json_keys: keys whose values are tokenized.

    Returns:
        One text per key, or ``None`` for a blank line (ignored, counted separately).

    Raises:
        BadRecord: invalid UTF-8, malformed JSON, not an object, missing key, non-string or empty
            value (``EMPTY_TEXT``: the pipeline skips and counts it under either ``on_error``).
    """
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(
            INVALID_UTF8, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    if not decoded.strip():
        return None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise BadRecord(MALFORMED_JSON, f"{e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in json_keys:
        if key not in record:
            present = ", ".join(sorted(record)[:8]) or "none"
            raise BadRecord(
                MISSING_KEY,
                f"key {key!r} missing (keys present: {present}); choose with --json-keys",
            )
        value = record[key]
        if not isinstance(value, str):
            raise BadRecord(
                NOT_A_STRING, f"value of {key!r} is {type(value).__name__}, not a string"
            )
        if not value:  # whitespace-only text is tokenized like any text (as Megatron-LM does)
            raise BadRecord(EMPTY_TEXT, f"value of {key!r} is empty")
        texts.append(value)
    return texts


def check_encodable(text: str, key: str) -> None:
    """Raises ``BadRecord(INVALID_UTF8)`` for text holding lone surrogates (valid JSON escapes such
    as ``"\\ud800"`` that no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(
            INVALID_UTF8,
            f"value of {key!r} holds an unpaired surrogate ({e.reason} at char {e.start})",
        ) from None
