#!/usr/bin/env python3
"""Build a small deterministic multi-domain corpus (code, books, web; ~3.5 MB) from the stdlib.

    python tools/make_sample_corpus.py --output-dir data/sample

Writes ``data/sample/{code,books,web}.jsonl`` (records ``{"text", "source", "domain"}``). Same
Python version -> same bytes on any machine; nothing is downloaded. Next steps:
tools/train_tokenizer.py, then tools/preprocess_data.py (see their docstrings).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longctx.data.preprocess.sample_corpus import make_sample_corpus


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies each domain's size budget (capped by the material available)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = make_sample_corpus(args.output_dir, args.scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for domain, info in report.items():
        print(
            f"{domain:6s} {info['documents']:5d} documents {info['bytes'] / 1e6:6.2f} MB  "
            f"{info['path']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
