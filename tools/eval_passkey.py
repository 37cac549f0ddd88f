#!/usr/bin/env python3
"""Passkey accuracy of checkpoints at several context lengths (one process, CPU or GPU).

    python tools/eval_passkey.py --checkpoint stage1=runs/x/checkpoints/iter_0000300 \\
        --checkpoint stage2=runs/x/checkpoints/iter_0000340 --lengths 256 1024 --samples 40

Each model runs with the RoPE stored in its checkpoint (a stage-1 model at 1,024 tokens runs its
stage-1 theta beyond its training length). Greedy exact match of the digits over prompts with
depths spread evenly over [0, 1] (megatron_longctx/eval/passkey.py). Prints one table and writes
``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="[LABEL=]DIR",
        help="a complete checkpoint directory (iter_NNNNNNN); repeat for several",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--samples", type=int, default=40, help="prompts per (checkpoint, length)")
    p.add_argument("--digits", type=int, default=5, help="passkey digits (make demo: 2)")
    p.add_argument(
        "--max-depth",
        type=float,
        default=1.0,
        help="key depths spread over [0, this] (make demo: 0.25, the key >= 3/4 of the context "
        "before the query)",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt seed (training data uses others)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    from megatron_longctx.checkpoint.dist import is_complete
    from megatron_longctx.eval.passkey import accuracy_grid

    results = {}
    for spec in args.checkpoint:
        label, _, path = spec.rpartition("=")
        label = label or Path(path).name
        if not is_complete(path):
            print(f"error: {path} is not a complete checkpoint (iter_NNNNNNN)", file=sys.stderr)
            return 2
        results[label] = accuracy_grid(
            path,
            args.lengths,
            args.samples,
            args.seed,
            num_digits=args.digits,
            max_depth=args.max_depth,
        )
    width = max(len(k) for k in results) + 2
    print(
        f"passkey accuracy ({args.samples} prompts per cell, key depth 0-{args.max_depth:g} of "
        f"the context, greedy exact match of {args.digits} digits)\n"
        + f"{'model':<{width}}"
        + "".join(f"{'@' + str(n):>8}" for n in args.lengths)
        + "  RoPE theta"
    )
    for label, r in results.items():
        print(
            f"{label:<{width}}"
            + "".join(f"{r['accuracy'][n]:>8.2f}" for n in args.lengths)
            + f"  {r['rope_theta']:g}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
