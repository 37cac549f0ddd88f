"""CPU attention benchmark: the project's block kernel vs torch SDPA, measured in the same run.

    python benchmarks/bench_attention.py [--doc-lengths 8192 32768 65536] [--skip-packed]
        [--skip-ring] [--ring-tokens 131072] [--ring-doc 16384]

Every case runs forward + backward in a fresh process with 1 thread (peak RSS is that process's
``ru_maxrss``, torch import included, so ratios compare like with like); 8 query / 2 KV heads,
head dim 64, fp32.

1. One causal document: ``ring_attention`` (CP 1, the ``auto`` kernel) vs
   ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``; targets: time <= 1.25x,
   peak RSS <= 1.5x SDPA's.
2. A packed 64K sequence of many documents (64 x 1K; ProLong-like short lengths from
   bench_cp's sampler): one document-masked call vs the sum of per-document SDPA calls; target
   time <= 1.25x.
3. Ring CP 2 on two gloo processes at 128K tokens (documents of ``--ring-doc`` tokens; one
   128K document is ~4x slower and needs the same memory): per-rank peak RSS, target <= 3 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megatron_longctx.testing.attention_cases import padded_cu  # noqa: E402

HQ, HK, D = 8, 2, 64


def _inputs(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, HQ, D, generator=g).requires_grad_()
    k = torch.randn(n, HK, D, generator=g).requires_grad_()
    v = torch.randn(n, HK, D, generator=g).requires_grad_()
    return q, k, v, torch.randn(n, HQ, D, generator=g)


def _run_case(kind: str, lengths: list[int]) -> dict:
    """Runs one case in this process; returns seconds (fwd + bwd) and peak RSS in GiB."""
    import resource

    import torch
    import torch.nn.functional as F

    from megatron_longctx.model.attention.blocks import CPLayout
    from megatron_longctx.model.attention.ring import ring_attention

    torch.set_num_threads(1)
    cu_p, cu_r = padded_cu(lengths, 1)
    q, k, v, grad = _inputs(cu_p[-1])
    start = time.perf_counter()
    if kind == "ours":
        out = ring_attention(q, k, v, CPLayout(cu_p, cu_r, 1), D**-0.5)
        out.backward(grad)
    else:  # torch SDPA, one call per document
        outs = []
        for a, n in zip(cu_p, lengths):
            qd, kd, vd, gd = (x[a : a + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v, grad))
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
            outs.append((o * gd).sum())
        torch.stack(outs).sum().backward()
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "rss_gib": rss}


def _case(kind: str, lengths: list[int]) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps([kind, lengths])]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"{kind} case failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _row(label: str, lengths: list[int]) -> None:
    base = _case("sdpa", lengths)
    ours = _case("ours", lengths)
    print(
        f"{label:28s} {base['seconds']:9.2f} {ours['seconds']:9.2f} "
        f"{ours['seconds'] / base['seconds']:7.2f}x {base['rss_gib']:8.2f} {ours['rss_gib']:8.2f} "
        f"{ours['rss_gib'] / base['rss_gib']:7.2f}x",
        flush=True,
    )


def _ring_worker(rank, world, lengths):
    import resource

    import torch.distributed as dist

    from megatron_longctx.model.attention.blocks import CPLayout
    from megatron_longctx.model.attention.ring import ring_attention
    from megatron_longctx.parallel.cp_split import rank_token_index

    cu_p, cu_r = padded_cu(lengths, world)
    idx = rank_token_index(cu_p, world, rank)
    q, k, v, grad = (x.detach()[idx].requires_grad_() for x in _inputs(cu_p[-1]))
    dist.barrier()
    start = time.perf_counter()
    out = ring_attention(q, k, v, CPLayout(cu_p, cu_r, world), D**-0.5, dist.group.WORLD)
    out.backward(grad.detach())
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--doc-lengths", type=int, nargs="*", default=[8192, 32768, 65536])
    p.add_argument("--skip-packed", action="store_true")
    p.add_argument("--skip-ring", action="store_true")
    p.add_argument("--ring-tokens", type=int, default=131072)
    p.add_argument("--ring-doc", type=int, default=16384)
    args = p.parse_args()
    if args.case:
        kind, lengths = json.loads(args.case)
        print(json.dumps(_run_case(kind, lengths)))
        return
    print(f"== fwd+bwd, 1 thread, {HQ}/{HK} heads, d {D}, fp32; baseline: torch SDPA (same run) ==")
    print(
        f"{'case':28s} {'SDPA s':>9s} {'ours s':>9s} {'ratio':>8s} "
        f"{'SDPA GiB':>8s} {'ours GiB':>8s} {'ratio':>8s}"
    )
    for n in args.doc_lengths:
        _row(f"one causal doc {n}", [n])
    if not args.skip_packed:
        import numpy as np
        from bench_cp import _short_docs

        _row("packed 64K: 64 x 1K docs", [1024] * 64)
        short = _short_docs(np.random.default_rng(0), 65536)
        _row(f"packed 64K: {len(short)} ProLong short", short)
    if not args.skip_ring:
        from megatron_longctx.testing.distributed import run_distributed

        n = args.ring_tokens
        lengths = [args.ring_doc] * (n // args.ring_doc)
        res = run_distributed(_ring_worker, 2, args=(lengths,), timeout=3600)
        worst = max(r[1] for r in res)
        print(
            f"\nring CP 2 (gloo), {n} tokens as {len(lengths)} x {args.ring_doc}: "
            f"{max(r[0] for r in res):.1f} s fwd+bwd, per-rank peak RSS "
            f"{', '.join(f'{r[1]:.2f}' for r in res)} GiB (target <= 3; "
            f"{'ok' if worst <= 3 else 'OVER'})"
        )


if __name__ == "__main__":
    main()
