#!/usr/bin/env python3
"""Train a sentencepiece BPE tokenizer (byte fallback, split digits, lossless) from JSONL.

Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``; EOD is id 2. Example (a few seconds on
the sample corpus):

    python tools/train_tokenizer.py --input data/sample --model-prefix data/tok/spm \\
        --vocab-size 8000

Then: ``python tools/preprocess_data.py --tokenizer-type SentencePieceTokenizer
--tokenizer-model data/tok/spm.model ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longctx.data.preprocess.tokenizer import load_tokenizer
from megatron_longctx.data.preprocess.train_spm import train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", required=True, nargs="+", help="JSONL file(s), glob(s) or directories"
    )
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--json-key", default="text")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=200_000,
        help="chunks sampled for training (bounds time and memory)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = train_sentencepiece(
            args.input,
            args.model_prefix,
            args.vocab_size,
            args.json_key,
            args.max_sentences,
            args.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (
        RuntimeError
    ) as e:  # sentencepiece's own complaints, e.g. vocabulary larger than the data
        print(
            f"error: sentencepiece training failed: {e}\n(lower --vocab-size or give more text)",
            file=sys.stderr,
        )
        return 1
    tok = load_tokenizer("SentencePieceTokenizer", path)
    print(f"wrote {path}: vocab {tok.vocab_size}, eod id {tok.eod_id}, bos id {tok.bos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
