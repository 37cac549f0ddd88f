#!/usr/bin/env python3
"""Write passkey-retrieval documents (synthetic token ids) as indexed datasets with a loss mask.

    python tools/make_passkey_data.py --output-prefix data/passkey --vocab-size 512 \\
        --lengths 32 64 128 256 1024 --count 4000 2000 800 200 100

Writes ``{prefix}_{L}.bin/.idx`` (tokens) and ``{prefix}_{L}_mask.bin/.idx`` (1 on the answer
digits) per length: a mixture component ``{prefixes: [{prefix}_{L}], mask_prefixes:
[{prefix}_{L}_mask]}``. Documents are exactly L tokens, so with L dividing a stage's seq_length no
passkey is cut. Layout and scoring: megatron_longctx/eval/passkey.py. ``make demo`` trains on them
(examples/tiny_cpu.yaml) and scores them with tools/eval_passkey.py.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longctx.eval.passkey import write_passkey_dataset


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--vocab-size", type=int, required=True, help="the model's vocabulary size")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="document lengths")
    p.add_argument("--count", type=int, nargs="+", required=True, help="documents per length")
    p.add_argument("--digits", type=int, default=5, help="passkey digits (make demo: 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.count) != len(args.lengths):
        print(
            f"error: --count needs one value per length ({len(args.lengths)}), got {args.count}",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.digits <= 10 or min(args.lengths) < 2 * args.digits + 3:
        print(
            f"error: --digits must be 1..10 and --lengths >= 2 * digits + 3 "
            f"({2 * args.digits + 3}); got {args.digits} digits, lengths {args.lengths}",
            file=sys.stderr,
        )
        return 2
    for i, (length, count) in enumerate(zip(args.lengths, args.count)):
        prefix, _ = write_passkey_dataset(
            f"{args.output_prefix}_{length}",
            [length] * count,
            args.vocab_size,
            seed=1000 * args.seed + i,
            num_digits=args.digits,
        )
    print(
        f"[passkey] {sum(args.count)} documents of "
        + "/".join(str(n) for n in args.lengths)
        + f" tokens -> {args.output_prefix}_*.bin/.idx (+ _mask)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
