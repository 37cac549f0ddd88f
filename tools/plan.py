#!/usr/bin/env python3
"""Plan TP / PP / CP / DP, micro batch and recompute for a model, sequence length and cluster.

    python tools/plan.py --model llama3-8b --seq-length 524288 --num-gpus 64 --gpus-per-node 8 \
        --gpu-memory-gb 80 [--global-batch-tokens 8388608] [--hardware h100] [--top 5]

Enumerates every layout ParallelLayout.validate accepts, estimates per-GPU memory, FLOPs
(Megatron's formula), communication and step time (megatron_longctx.perf), drops what does not fit,
and prints the fastest as dotted overrides for a curriculum stage of a recipe, e.g.
``stages.1.parallel.context_parallel_size=16``. Estimates rank layouts; they are not measurements.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longctx.model.config import PRESETS, get_preset, resolve_loss_chunk_tokens
from megatron_longctx.perf.hardware import HARDWARE, get_hardware
from megatron_longctx.perf.planner import (
    CHECKPOINT_EVERY_S,
    DEFAULT_GLOBAL_BATCH_TOKENS,
    PlanRequest,
    checkpoint_interval,
    enumerate_plans,
)


def main(argv: list[str] | None = None) -> int:
    """Runs the planner; returns the exit status (1 when nothing fits)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(PRESETS))
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--num-gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="GPU memory in GB (1e9 bytes); default the hardware preset's",
    )
    p.add_argument("--global-batch-tokens", type=int, default=DEFAULT_GLOBAL_BATCH_TOKENS)
    p.add_argument("--hardware", default="h100", choices=sorted(HARDWARE))
    p.add_argument(
        "--doc-length",
        type=int,
        default=None,
        help="typical document length for the document-masked attention FLOPs "
        "(sequences of seq-length / doc-length equal documents); default one",
    )
    p.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=None,
        help="tokens per loss chunk, as the stage field stages.N.loss_chunk_tokens: 0 = "
        "Megatron's unchunked loss; default the trainer's rule (2048 above 8192 tokens, else 0)",
    )
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--stage", type=int, default=0, help="curriculum stage index for overrides")
    args = p.parse_args(argv)

    docs = None
    if args.doc_length:
        if args.seq_length % args.doc_length:
            p.error(
                f"--seq-length {args.seq_length} is not a multiple of --doc-length "
                f"{args.doc_length}"
            )
        docs = (args.doc_length,) * (args.seq_length // args.doc_length)
    try:
        chunk = resolve_loss_chunk_tokens(args.loss_chunk_tokens, args.seq_length)
        req = PlanRequest(
            get_preset(args.model),
            args.seq_length,
            args.num_gpus,
            args.gpus_per_node,
            get_hardware(args.hardware, args.gpu_memory_gb),
            args.global_batch_tokens,
            docs,
            chunk,
        )
    except (ValueError, KeyError) as err:
        p.error(str(err))
    plans = enumerate_plans(req)
    fitting = sorted((q for q in plans if q.fits), key=lambda q: (q.step_time_s, q.memory.total))
    hw = req.hardware
    print(
        f"{args.model}, S={args.seq_length:,}, {args.num_gpus} x {hw.name} "
        f"({hw.memory_bytes / 1e9:.0f} GB, {args.gpus_per_node}/node), "
        f"{req.global_batch_size} samples = {req.global_batch_tokens:,} tokens per step, "
        f"loss {f'in chunks of {chunk:,} tokens' if chunk else 'unchunked (Megatron)'}"
    )
    print(
        f"{len(plans)} valid layouts, {len(fitting)} fit in "
        f"{req.usable_memory_fraction:.0%} of memory"
    )
    if not fitting:
        closest = min(plans, key=lambda q: q.memory.total, default=None)
        if closest is not None:
            print(f"nothing fits; closest: {closest.describe()}\n  {closest.reason}")
        return 1
    for rank, q in enumerate(fitting[: args.top], 1):
        print(f"\n#{rank} {q.describe()}")
        print(f"   memory {q.memory.summary()}")
        c = q.comm
        print(
            f"   comm/step: TP {c.tp_bytes / 1e9:.1f} GB ({c.tp_s:.2f} s), CP "
            f"{c.cp_bytes / 1e9:.1f} GB ({c.cp_s:.2f} s, overlapped), DP {c.dp_bytes / 1e9:.1f} "
            f"GB ({c.dp_s:.2f} s), PP {c.pp_bytes / 1e9:.1f} GB ({c.pp_s:.2f} s)"
        )
        if q.distributed_optimizer:
            print("   distributed optimizer: on (Megatron's use_distributed_optimizer)")
        print("   " + " ".join(q.overrides(args.stage)))
        print(
            f"   checkpoint about every {CHECKPOINT_EVERY_S / 60:.0f} min at this step time: "
            f"stages.{args.stage}.checkpoint_interval={checkpoint_interval(q.step_time_s)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
