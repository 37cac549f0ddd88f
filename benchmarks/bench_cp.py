"""Context-parallel benchmark: communication volume, load balance under document masks, CPU time.

    python benchmarks/bench_cp.py [--samples 8] [--skip-comm] [--skip-time]

1. Bytes sent per rank per layer by ring and all-to-all attention (measured on gloo, CP 2 and 4)
   vs the theoretical minimum of each scheme (ratio; target 1.00).
2. Attention-work balance (max / min allowed score pairs across CP ranks, median over samples) of
   zigzag over the whole sequence vs zigzag within documents, on ProLong-like length mixes
   (512K-token samples: 64K documents + short filler; one 512K document; short documents only);
   also with linear work at Llama-3-8B's ratio, and the padding cost. Target <= 1.10.
3. CPU time of ring attention forward + backward, CP 2 vs CP 1 at S = 2,048 (for information).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_longctx.parallel.balance import (  # noqa: E402
    attention_work_per_rank,
    imbalance,
    padding_fraction,
)

LINEAR_PAIRS_PER_TOKEN = 28_600  # Llama-3-8B: one token's matmul work in attention score pairs
HQ, HK, D = 8, 4, 64


def _short_docs(rng, total: int) -> list[int]:
    lengths = []
    while total > 0:
        n = int(min(max(rng.lognormal(6.7, 1.0), 16), 16384, total))
        lengths.append(n)
        total -= n
    return lengths


def sample_lengths(kind: str, rng, seq: int = 524_288) -> list[int]:
    if kind == "64k_docs+filler":
        num_long = int(rng.integers(1, 8))
        return [65_536] * num_long + _short_docs(rng, seq - 65_536 * num_long)
    if kind == "one_512k_doc":
        return [seq]
    return _short_docs(rng, seq)


def balance_report(num_samples: int) -> None:
    print("\n== attention-work balance: max/min across CP ranks (median over samples) ==")
    print(
        f"{'mix':18s} {'CP':>3s} {'seq zigzag':>11s} {'doc zigzag':>11s} "
        f"{'seq+lin':>8s} {'doc+lin':>8s} {'padding':>8s}"
    )
    for kind in ("64k_docs+filler", "one_512k_doc", "short_only"):
        for cp in (8, 16, 32):
            rng = np.random.default_rng(cp)
            rows = []
            for _ in range(num_samples):
                lengths = sample_lengths(kind, rng)
                rows.append(
                    [
                        imbalance(attention_work_per_rank(lengths, cp, "sequence_zigzag")),
                        imbalance(attention_work_per_rank(lengths, cp, "document_zigzag")),
                        imbalance(
                            attention_work_per_rank(
                                lengths, cp, "sequence_zigzag", LINEAR_PAIRS_PER_TOKEN
                            )
                        ),
                        imbalance(
                            attention_work_per_rank(
                                lengths, cp, "document_zigzag", LINEAR_PAIRS_PER_TOKEN
                            )
                        ),
                        padding_fraction(lengths, cp),
                    ]
                )
            med = [statistics.median(col) for col in zip(*rows)]
            print(
                f"{kind:18s} {cp:3d} {med[0]:11.3f} {med[1]:11.3f} {med[2]:8.3f} "
                f"{med[3]:8.3f} {med[4] * 100:7.2f}%"
            )


def _comm_worker(rank, world, seq, repeats):
    import torch
    import torch.distributed as dist

    from megatron_longctx.model.attention import a2a, ring
    from megatron_longctx.model.attention.blocks import CPLayout

    cu = [0, seq // 2, seq]
    layout = CPLayout(cu, cu, world)
    t = seq // world
    g = torch.Generator().manual_seed(rank)
    out = {}
    for mode in ("ring", "a2a") if world > 1 else ("ring",):
        for stats in (ring.COMM_BYTES, a2a.COMM_BYTES):
            for key in stats:
                stats[key] = 0
        times = []
        for _ in range(repeats):
            q = torch.randn(t, HQ, D, generator=g, requires_grad=True)
            k = torch.randn(t, HK, D, generator=g, requires_grad=True)
            v = torch.randn(t, HK, D, generator=g, requires_grad=True)
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            if mode == "ring":
                group = dist.group.WORLD if world > 1 else None
                y = ring.ring_attention(q, k, v, layout, D**-0.5, group)
            else:
                y = a2a.a2a_attention(q, k, v, layout, D**-0.5, dist.group.WORLD)
            y.sum().backward()
            times.append(time.perf_counter() - start)
        sent = {**ring.COMM_BYTES, **a2a.COMM_BYTES}
        out[mode] = ({key: val // repeats for key, val in sent.items()}, statistics.median(times))
    return out


def comm_report(seq: int = 1024) -> None:
    from megatron_longctx.testing.distributed import run_distributed

    print(
        f"\n== bytes sent per rank per layer (fp32, S={seq}, {HQ} q heads, {HK} kv heads, d={D}) =="
    )
    for cp in (2, 4):
        res = run_distributed(_comm_worker, cp, args=(seq, 1), timeout=300)[0]
        t = seq // cp
        kv = 2 * t * HK * D * 4
        qkvo = t * (2 * HQ + 2 * HK) * D * 4
        ring_sent, _ = res["ring"]
        a2a_sent, _ = res["a2a"]
        ring_fwd, ring_bwd = ring_sent["kv_fwd"], ring_sent["kv_bwd"] + ring_sent["dkv_bwd"]
        a2a_fwd, a2a_bwd = a2a_sent["a2a_fwd"], a2a_sent["a2a_bwd"]
        ring_min_fwd, ring_min_bwd = (cp - 1) * kv, 2 * (cp - 1) * kv
        a2a_min = qkvo * (cp - 1) // cp
        print(
            f"CP {cp} ring fwd {ring_fwd:>9d} B (min {ring_min_fwd:>9d}, ratio "
            f"{ring_fwd / ring_min_fwd:.2f}) | bwd {ring_bwd:>9d} B (min {ring_min_bwd:>9d}, "
            f"ratio {ring_bwd / ring_min_bwd:.2f})"
        )
        print(
            f"CP {cp} a2a  fwd {a2a_fwd:>9d} B (min {a2a_min:>9d}, ratio "
            f"{a2a_fwd / a2a_min:.2f}) | bwd {a2a_bwd:>9d} B (min {a2a_min:>9d}, "
            f"ratio {a2a_bwd / a2a_min:.2f})"
        )
    print(
        "ring minimum: every rank's K/V must reach the other CP-1 ranks (fwd), and again plus "
        "their dK/dV back (bwd); a2a minimum: (CP-1)/CP of q, k, v and out leave the rank."
    )


def time_report(seq: int = 2048) -> None:
    from megatron_longctx.testing.distributed import run_distributed

    print(f"\n== CPU time, ring attention fwd+bwd, S={seq} (one document), fp32, median of 3 ==")
    t1 = run_distributed(_comm_worker, 1, args=(seq, 3), timeout=300)[0]["ring"][1]
    t2 = run_distributed(_comm_worker, 2, args=(seq, 3), timeout=300)[0]["ring"][1]
    print(
        f"CP 1: {t1 * 1e3:.0f} ms   CP 2: {t2 * 1e3:.0f} ms per rank   speed-up {t1 / t2:.2f}x "
        f"(2 CPU cores shared; for information)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--skip-comm", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    if not args.skip_comm:
        comm_report()
    balance_report(args.samples)
    if not args.skip_time:
        time_report()


if __name__ == "__main__":
    main()
