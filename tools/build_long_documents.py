#!/usr/bin/env python3
"""Build long JSONL documents: one per code repository, or one per book (text file).

    python tools/build_long_documents.py code-repos --input-dir /path/to/repos \\
        --output data/code.jsonl
    python tools/build_long_documents.py books --input-dir /path/to/books \\
        --output data/books.jsonl

``code-repos`` treats each subdirectory of ``--input-dir`` as a repository and concatenates its
files in sorted order with a ``# ===== path =====`` header per file, skipping vendored directories,
binary, huge (``--max-file-bytes``) and generated files. ``books`` makes one document per
.txt/.md/.rst file. Each record is ``{"text": ..., "source": ...}``; feed the output to
tools/preprocess_data.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longctx.data.long_documents import (
    iter_book_documents,
    iter_code_repo_documents,
    write_jsonl,
)


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("code-repos", "books"))
    p.add_argument("--input-dir", required=True)
    p.add_argument("--output", required=True, help="output .jsonl path")
    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=1 << 20,
        help="code-repos: skip files larger than this (default 1 MiB)",
    )
    p.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.mode == "code-repos":
            records = iter_code_repo_documents(args.input_dir, args.max_file_bytes, args.min_chars)
        else:
            records = iter_book_documents(args.input_dir, args.min_chars)
        count = write_jsonl(records, args.output)
    except NotADirectoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if count == 0:
        print(
            f"error: no documents found under {args.input_dir} in {args.mode} mode", file=sys.stderr
        )
        return 1
    print(f"wrote {count} documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
