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

In-process mode (``--megatron``, issue 29): the megatron checkpoint itself, no export, on N
processes with a chosen layout, scored by teacher forcing (needle, multi-key needle, JSON KV; loss
by position at the full length) -- the stage-end evaluation's code:

    torchrun --nproc-per-node 4 tools/eval_longctx.py --megatron --load runs/x/checkpoints \
        --output-dir out/eval_tf --tensor-model-parallel-size 2 --context-parallel-size 2 \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok/spm.model \
        --seq-length 65536 --context-lengths 16384 65536 --bf16

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
    p.add_argument(
        "--context-lengths",
        type=int,
        nargs="+",
        default=None,
        help="default: 256 512 1024 (--megatron: the sequence length)",
    )
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
    tf = p.add_argument_group("in-process mode (--megatron --load CKPT, under torchrun / srun)")
    tf.add_argument("--megatron", action="store_true", help="evaluate the megatron checkpoint "
                    "in-process with the layout below (teacher-forced tasks)")
    tf.add_argument("--tensor-model-parallel-size", type=int, default=1)
    tf.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    tf.add_argument("--context-parallel-size", type=int, default=1)
    tf.add_argument("--sequence-parallel", action="store_true")
    tf.add_argument("--core-attention", default="auto", help="auto | local | ring | a2a | te")
    tf.add_argument("--seq-length", type=int, default=None,
                    help="longest packed sequence (default: max_position_embeddings)")
    tf.add_argument("--bf16", action="store_true", help="run the model in bf16")
    tf.add_argument("--tf-tasks", nargs="+", default=None,
                    choices=["needle", "niah_multikey", "json_kv", "loss"],
                    help="default: needle niah_multikey json_kv (+ loss with --loss-data)")
    tf.add_argument("--max-forward-tokens", type=int, default=None, help="cost bound")
    return p.parse_args(argv)


def run_megatron(args) -> dict:
    """``--megatron``: every process evaluates its share; rank 0 writes the results."""
    from megatron_longctx.data.preprocess.tokenizer import load_tokenizer
    from megatron_longctx.eval.checkpoint_eval import evaluate_megatron_checkpoint
    from megatron_longctx.eval.teacher_forced import TeacherForcedSettings
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import init_process_group

    if not (args.load and args.tokenizer_type and args.tokenizer_model):
        raise ValueError(
            "--megatron needs --load CKPT, --tokenizer-type and --tokenizer-model (the "
            "tokenizer the model was trained with)"
        )
    settings = TeacherForcedSettings(
        context_lengths=args.context_lengths,
        depths=args.depths,
        num_samples=args.num_samples,
        tasks=args.tf_tasks
        or (["needle", "niah_multikey", "json_kv"] + (["loss"] if args.loss_data else [])),
        seed=args.seed,
        loss_data=args.loss_data,
        loss_length=args.loss_length,
        loss_num_documents=args.loss_num_documents,
        num_position_buckets=args.num_position_buckets,
        max_forward_tokens=args.max_forward_tokens,
        max_seconds=None,
        plots=not args.no_plots,
    )
    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model)
    layout = ParallelLayout(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
    )
    device = init_process_group()
    return evaluate_megatron_checkpoint(
        args.load,
        args.output_dir,
        settings,
        tokenizer,
        layout,
        core_attention=args.core_attention,
        seq_length=args.seq_length,
        bf16=args.bf16,
        device=device,
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.megatron:
        from megatron_longctx.eval.teacher_forced import format_tf_report

        try:
            results = run_megatron(args)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_tf_report(results, results.get("checkpoint", "")))
            print(f"-> {os.path.join(args.output_dir, 'eval_results.json')}")
        return 0
    tasks = args.tasks or (["needle", "ruler"] + (["loss"] if args.loss_data else []))
    try:
        settings = EvalSettings(
            context_lengths=args.context_lengths or [256, 512, 1024],
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
