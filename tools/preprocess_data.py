#!/usr/bin/env python3
"""Tokenize JSONL corpora into Megatron-Core indexed datasets (``.bin``/``.idx``) + length stats.

Flags keep Megatron-LM's ``tools/preprocess_data.py`` names. Outputs per JSON key:
``{output_prefix}_{key}_document.bin/.idx`` (read by ``megatron.core.datasets.indexed_dataset.
IndexedDataset``) and ``{output_prefix}_{key}_stats.json`` (+ ``_length_hist.png`` with ``--plot``).

Demo chain (well under a minute on 2 cores):

    python tools/make_sample_corpus.py --output-dir data/sample
    python tools/train_tokenizer.py --input data/sample --model-prefix data/tok/spm \\
        --vocab-size 8000
    python tools/preprocess_data.py --input data/sample --output-prefix data/tokens/sample \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok/spm.model \\
        --append-eod --workers 2

A Llama 3 tokenizer directory works the same way:
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model /path/to/Llama-3-8B`` (tokens are int32).
Empty documents (``"text": ""``) are skipped and counted (``empty_text``, with a warning) under
either ``--on-error``; whitespace-only text is tokenized like any text (as in Megatron-LM).
Exit status: 0 on success, 1 on a bad record with ``--on-error fail`` (the message is
``file:line: reason: detail`` and no output is left behind), 2 on bad flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from megatron_longctx.data.preprocess.pipeline import (
    ON_ERROR_CHOICES,
    PreprocessConfig,
    PreprocessError,
    preprocess,
)
from megatron_longctx.data.preprocess.tokenizer import TOKENIZER_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (Megatron-LM names plus --on-error, --quiet, --plot)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help=".jsonl/.jsonl.gz file(s), glob(s) (quoted) or director(ies)",
    )
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)"
    )
    p.add_argument("--output-prefix", required=True, help="prefix of the output files")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument(
        "--tokenizer-model",
        required=True,
        help="sentencepiece .model, or tokenizer.json / a directory holding one",
    )
    p.add_argument(
        "--append-eod", action="store_true", help="append the EOD token to each document"
    )
    p.add_argument(
        "--eod-token",
        default=None,
        help="with --append-eod: the separator, a token (<|endoftext|>) or an id. Default: the "
        "tokenizer's end-of-text token (<|end_of_text|>, <|endoftext|>, </s>, <eos>) when it has "
        "one, else its EOS (instruct tokenizers name their end-of-turn token EOS: <|im_end|>, "
        "<|eot_id|>). Recorded in the stats as eod_token / eod_id",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument(
        "--log-interval", type=int, default=1000, help="documents between progress updates"
    )
    p.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="fail",
        help="fail: stop at the first bad record (malformed JSON, missing key, ...), write "
        "nothing; skip: count and skip it. Either way an empty text is skipped, counted "
        "(empty_text) and warned about, and whitespace-only text is tokenized like any text",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--plot", action="store_true", help="also write the length histogram as a PNG")
    p.add_argument(
        "--max-piece-chars",
        type=int,
        default=PreprocessConfig.max_piece_chars,
        help="most characters per tokenizer call: longer documents are encoded in pieces cut where "
        "the tokens cannot change, spread over all workers (bounds worker memory)",
    )
    return p.parse_args(argv)


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    # SystemExit unwinds through preprocess(), which deletes every temporary output.
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    signal.signal(signal.SIGTERM, _terminate)
    try:
        config = PreprocessConfig(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            eod_token=args.eod_token,
            workers=args.workers,
            log_interval=args.log_interval,
            on_error=args.on_error,
            quiet=args.quiet,
            plot=args.plot,
            max_piece_chars=args.max_piece_chars,
        )
        report = preprocess(config)
    except (PreprocessError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    skipped = ", ".join(f"{k}={v}" for k, v in report.skipped.items() if v) or "none"
    for key, stats in report.stats.items():
        print(
            f"[{key}] {stats['documents']:,} documents, {stats['tokens']:,} tokens "
            f"({stats['dtype']}), "
            f"length min/median/max {stats['min_length']}/{stats['median_length']:g}/"
            f"{stats['max_length']} -> {report.outputs[key]['prefix']}.bin/.idx"
        )
    print(
        f"skipped records: {skipped}; blank lines: {report.num_blank_lines}; "
        f"{report.num_tokens / max(report.seconds, 1e-9):,.0f} tokens/s in {report.seconds:.1f}s"
    )
    split = report.split
    print(
        f"split documents: {split.documents:,} ({split.pieces:,} pieces; {report.split_method})"
        + (f"; {split.unsplit:,} long records encoded whole" if split.unsplit else "")
        + (f"; {split.oversized:,} pieces over the size (no safe cut)" if split.oversized else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
