#!/usr/bin/env python3
"""Output layer + cross entropy, forward + backward: the chunked loss vs megatron's, peak memory
and time in one run.

    python benchmarks/bench_loss.py [--tokens 8192 32768 65536] [--hidden 512 4096] \
        [--vocab 128256] [--chunk 2048] [--dtype fp32|bf16] [--max-gib 12] [--max-tflop 5] \
        [--device cpu|cuda]

For every (hidden, tokens) pair both paths run in their own fresh process, one rank (TP 1):
megatron's output layer (``linear_with_grad_accumulation_and_async_allreduce``, what
ColumnParallelLinear calls) + ``vocab_parallel_cross_entropy``, and model/loss.py's
``chunked_language_model_loss`` given the loss mask, as the trainer calls it (gradients formed in
forward; the loss is the masked token mean). Peak memory is the rise over the process's
footprint once the inputs (hidden states, output weight, targets) exist: peak RSS on CPU
(``ru_maxrss``), peak allocated on CUDA. A run whose estimated peak exceeds ``--max-gib`` is
skipped and its estimate printed (megatron's: the fp32 logits / softmax [tokens, V] plus the
weight gradient), and so is one above ``--max-tflop`` of matmul work (default 5 on CPU, where
64K x 4,096 takes hours; no limit on CUDA). Ratios are chunked / megatron in the same run. Estimates are marked ``~``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(method: str, tokens: int, hidden: int, vocab: int, chunk: int, dtype: str, device: str):
    """Runs one fwd+bwd in this process; prints a JSON record."""
    import torch

    from megatron_longctx.eval.passkey import init_single_process

    init_single_process()  # gloo world 1 + megatron groups (TP = 1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.layers import (
        linear_with_grad_accumulation_and_async_allreduce,
    )

    from megatron_longctx.model.loss import chunked_language_model_loss

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    hid = (torch.randn(tokens, 1, hidden, generator=g) * 0.5).to(dev, dt).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dev, dt).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(dev)
    mask = (torch.rand(1, tokens, generator=g) > 0.1).float().to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    if method == "megatron":
        logits = linear_with_grad_accumulation_and_async_allreduce(
            hid, weight, None, False, False, sequence_parallel=False
        )
        losses = vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
        del logits
    else:
        losses = chunked_language_model_loss(hid, weight, labels, chunk, loss_mask=mask)
    loss = (losses * mask).sum() / mask.sum()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(loss=loss.item(), seconds=seconds, peak_bytes=peak)))


def estimate(method: str, tokens: int, hidden: int, vocab: int, chunk: int, dtype: str) -> float:
    """Peak bytes above the inputs (logits / softmax, gradients of hidden and weight)."""
    b = 4 if dtype == "fp32" else 2
    grads = (tokens + vocab) * hidden * b
    if method == "megatron":
        return tokens * vocab * (4 + (0 if b == 4 else b)) + grads
    # one fp32 [chunk, V] buffer (+ the activation-dtype logits), the fp32 weight-gradient
    # accumulator, log-sum-exp + target per token (perf/memory.py loss_bytes)
    acc = vocab * hidden * 4 if b < 4 else 0  # fp32: the accumulator is the returned gradient
    return chunk * vocab * (4 + (b if b < 4 else 0)) + grads + acc + tokens * 12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-gib", type=float, default=12.0, help="skip runs estimated above this")
    p.add_argument("--max-tflop", type=float, default=None, help="skip slower runs (CPU: 5)")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "TOKENS", "HIDDEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_tflop is None:
        args.max_tflop = float("inf") if args.device.startswith("cuda") else 5.0
    if args.one:
        method, tokens, hidden = args.one[0], int(args.one[1]), int(args.one[2])
        one(method, tokens, hidden, args.vocab, args.chunk, args.dtype, args.device)
        return 0
    print(
        f"output layer + loss fwd+bwd, vocab {args.vocab:,}, chunk {args.chunk}, {args.dtype}, "
        f"{args.device}; peak = rise over the inputs; ~ = estimate (run skipped: > --max-gib)"
    )
    print(f"{'hidden':>6} {'tokens':>7} | {'megatron GiB':>12} {'s':>8} | "
          f"{'chunked GiB':>11} {'s':>8} | {'mem ratio':>9} {'time ratio':>10}")
    for hidden in args.hidden:
        for tokens in args.tokens:
            row = {}
            for method in ("megatron", "chunked"):
                est = estimate(method, tokens, hidden, args.vocab, args.chunk, args.dtype)
                tflop = 3 * 2 * tokens * hidden * args.vocab / 1e12  # logits, dgrad, wgrad
                if est > args.max_gib * GIB or tflop > args.max_tflop:
                    row[method] = dict(peak_bytes=est, seconds=None, estimated=True)
                    continue
                cmd = [sys.executable, __file__, "--one", method, str(tokens), str(hidden),
                       "--vocab", str(args.vocab), "--chunk", str(args.chunk),
                       "--dtype", args.dtype, "--device", args.device]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
                row[method] = json.loads(out.stdout.strip().splitlines()[-1])
            m, c = row["megatron"], row["chunked"]

            def mem(r):
                return f"{'~' if r.get('estimated') else ''}{r['peak_bytes'] / GIB:.2f}"

            def sec(r):
                return "-" if r["seconds"] is None else f"{r['seconds']:.1f}"

            ratio_t = (
                f"{c['seconds'] / m['seconds']:.2f}x"
                if m["seconds"] is not None and c["seconds"] is not None
                else "-"
            )
            both = not (m.get("estimated") or c.get("estimated"))
            ratio_m = f"{'' if both else '~'}{c['peak_bytes'] / m['peak_bytes']:.3f}"
            if "loss" in m and "loss" in c:
                assert abs(m["loss"] - c["loss"]) <= 1e-3 * abs(m["loss"]), (m, c)
            print(f"{hidden:>6} {tokens:>7} | {mem(m):>12} {sec(m):>8} | {mem(c):>11} "
                  f"{sec(c):>8} | {ratio_m:>9} {ratio_t:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
