#!/usr/bin/env python3
"""Tokenize chat JSONL (``{"messages": [{role, content}, ...]}``) into SFT indexed datasets.

Writes ``{output_prefix}_text_document.bin/.idx`` (tokens, rendered with the tokenizer's own
chat_template when it has one, else the built-in Llama-3-style template; the tool prints which),
``{output_prefix}_mask_document.bin/.idx`` (1 on assistant tokens and their end-of-turn token, else
0; same document sizes) and ``{output_prefix}_sft_stats.json``. Use them in a mixture component as
``prefixes: [..._text_document]`` and ``mask_prefixes: [..._mask_document]`` (see
``examples/mixtures/sft_ultrachat.yaml``):

    python tools/preprocess_sft.py --input data/ultrachat.jsonl \\
        --output-prefix data/sft/ultrachat --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tok/spm.model

Exit status: 0 on success, 1 on a bad record with ``--on-error fail`` (message
``file:line: reason: detail``; nothing is written) or no valid conversation, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longctx.data.preprocess.tokenizer import TOKENIZER_TYPES
from megatron_longctx.data.sft import ON_ERROR_CHOICES, SFTConfig, SFTError, preprocess_sft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (Megatron-LM names where they exist)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+", help="chat .jsonl/.jsonl.gz, globs or dirs")
    p.add_argument("--output-prefix", required=True, help="prefix of the output files")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument(
        "--tokenizer-model",
        required=True,
        help="sentencepiece .model, or tokenizer.json / a directory holding one",
    )
    p.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="fail",
        help="fail: stop at the first bad record, write nothing; skip: count and skip",
    )
    p.add_argument(
        "--chat-template",
        choices=("auto", "tokenizer", "builtin"),
        default="auto",
        help="auto: the tokenizer's own chat_template (tokenizer_config.json / "
        "chat_template.jinja) when it has one, else the built-in Llama-3-style template; "
        "tokenizer: require the tokenizer's; builtin: always the built-in one",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = preprocess_sft(
            SFTConfig(
                args.input,
                args.output_prefix,
                args.tokenizer_type,
                args.tokenizer_model,
                args.on_error,
                args.chat_template,
            )
        )
    except (SFTError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "none"
    print(
        f"{report.num_conversations:,} conversations, {report.num_tokens:,} tokens, "
        f"{report.num_assistant_tokens:,} assistant (trained) tokens; skipped: {skipped}"
    )
    print(f"chat template: {report.chat_template}")
    print(f"-> {report.text_prefix}.bin/.idx and {report.mask_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
