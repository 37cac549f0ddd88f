#!/usr/bin/env python3
"""Long-context evaluation of an HF export (or a megatron checkpoint, exported first).

Needle-in-a-haystack grid (lengths x depths, PNG heatmap), RULER-style synthetic tasks (multi-key /
multi-value needles, variable tracking, frequent words; greedy, exact match), loss by position on
held-out indexed-dataset documents (PNG plot). Writes ``eval_results.json`` + ``report.md`` to
``--output-dir`` and prints the report. Offline: nothing is downloaded.

    python tools/eval_longctx.py --hf-dir out/hf --output-dir out/eval \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok/spm.model \\
        --context-lengths 512 1024 2048 --depths 0 0.25 0.5 0.75 1 --num-samples 4 \\
        --loss-data data/tokens/sample_text_document

    python tools/eval_longctx.py --load runs/tiny/checkpoints --output-dir out/eval ...

Lengths beyond the model's max_position_embeddings are skipped and listed in the results.
Exit status: 0 on success, 1 on bad inputs (the message names the fix), 2 on bad flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.data.preprocess.tokenizer import TOKENIZER_TYPES  # noqa: E402
from megatron_longctx.eval import EvalSettings, evaluate, evaluate_checkpoint  # noqa: E402
from megatron_longctx.eval.runner import format_report  # noqa: E402
from megatron_longctx.eval.tasks import RULER_TASKS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="HF export directory (config.json + safetensors)")
    src.add_argument("--load", help="megatron checkpoint dir (exported with convert_checkpoint)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", help="default: tokenizer.json of the HF dir")
    p.add_argument("--context-lengths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--num-samples", type=int, default=4, help="samples per cell")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=["needle", "ruler", "loss"],
        help="default: needle ruler (+ loss when --loss-data is given)",
    )
    p.add_argument("--ruler-tasks", nargs="+", default=list(RULER_TASKS), choices=RULER_TASKS)
    p.add_argument("--loss-data", nargs="+", default=[], help="held-out indexed-dataset prefixes")
    p.add_argument("--loss-length", type=int, default=None)
    p.add_argument("--loss-num-documents", type=int, default=8)
    p.add_argument("--num-position-buckets", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    tasks = args.tasks or (["needle", "ruler"] + (["loss"] if args.loss_data else []))
    try:
        settings = EvalSettings(
            context_lengths=args.context_lengths,
            depths=args.depths,
            num_samples=args.num_samples,
            tasks=tasks,
            ruler_tasks=args.ruler_tasks,
            seed=args.seed,
            batch_size=args.batch_size,
            loss_data=args.loss_data,
            loss_length=args.loss_length,
            loss_num_documents=args.loss_num_documents,
            num_position_buckets=args.num_position_buckets,
            plots=not args.no_plots,
        )
        kw = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model}
        if args.hf_dir:
            results = evaluate(args.hf_dir, args.output_dir, settings, **kw)
        else:
            results = evaluate_checkpoint(args.load, args.output_dir, settings, **kw)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(results))
    print(f"-> {os.path.join(args.output_dir, 'eval_results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
