#!/usr/bin/env python3
"""Report what a mixture really feeds the model: token share per component and length bucket.

    python tools/inspect_mixture.py --mixture examples/mixtures/prolong_64k.yaml \\
        --seq-length 65536 --num-samples 2000 --vocab-size 128256 --png mixture.png

Builds (or loads from ``--cache-dir``) the stage's sample index, then over the first N samples
prints: realized token share per component vs its weight, the share of tokens by the length of the
document they come from, the distribution of documents per sample, and the index counts (documents
kept/dropped, documents carried across samples, epochs restarted), and the load balance the
stage will get (``--context-parallel-size``, ``--dp-size``, ``--global-batch-size``,
``--cp-sharding``): max/mean work across CP and DP ranks per step (parallel/dp_assign.py) and the
padding share, for the balanced assignment (DP ranks may run different numbers of micro-batches)
and megatron's order, with the best any assignment of whole samples can reach (DP bound). Writes
the same as a PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LENGTH_BINS = [0, 4096, 32768, 65536, 131072, 524288, np.inf]
BIN_LABELS = ["<4K", "4K-32K", "32K-64K", "64K-128K", "128K-512K", ">=512K"]


def realized_shares(index, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token counts per component, per (component, document-length bin), and docs per sample."""
    from megatron_longctx.data.packing import sample_pieces

    num_comp = len(index.spec.components)
    per_comp = np.zeros(num_comp, dtype=np.int64)
    per_bin = np.zeros((num_comp, len(BIN_LABELS)), dtype=np.int64)
    S = index.seq_length
    for s in range(num_samples):
        c, pieces = sample_pieces(index, s)
        comp = index.components[c]
        seen = 0
        for doc, _, _, n in pieces:
            n = min(n, S - seen)  # count the S inputs, not the extra label token
            if n <= 0:
                break
            b = np.searchsorted(LENGTH_BINS, comp.doc_length[doc], side="right") - 1
            per_bin[c, b] += n
            seen += n
        per_comp[c] += S
    return per_comp, per_bin, np.asarray(index.docs_per_sample()[:num_samples])


def format_report(index, per_comp, per_bin, docs) -> str:
    total = per_comp.sum()
    lines = [
        f"{'component':18s} {'bucket':20s} {'weight':>8s} {'realized':>9s} {'diff':>8s}  "
        + " ".join(f"{b:>9s}" for b in BIN_LABELS)
    ]
    for c, comp in enumerate(index.spec.components):
        shares = per_bin[c] / total
        lines.append(
            f"{comp.name:18s} {comp.bucket_label():20s} {comp.weight:8.4f} "
            f"{per_comp[c] / total:9.4f} {per_comp[c] / total - comp.weight:+8.4f}  "
            + " ".join(f"{x:9.4f}" for x in shares)
        )
    lines.append(
        f"{'all':18s} {'':20s} {1.0:8.4f} {1.0:9.4f} {'':8s}  "
        + " ".join(f"{x:9.4f}" for x in per_bin.sum(0) / total)
    )
    q = np.percentile(docs, [0, 50, 90, 99, 100])
    lines.append(
        f"\ndocuments per sample over {len(docs)} samples: mean {docs.mean():.1f}, "
        f"min {q[0]:.0f}, p50 {q[1]:.0f}, p90 {q[2]:.0f}, p99 {q[3]:.0f}, max {q[4]:.0f}"
    )
    lines.append("\nindex counts (whole stage):")
    for st in index.stats["components"]:
        lines.append(
            f"  {st['name']:18s} kept {st['docs_kept']:,} docs / {st['tokens_kept']:,} tokens; "
            f"dropped {st['docs_dropped_below_min']:,} below min, {st['docs_dropped_above_max']:,}"
            f" above max; carried {st['docs_carried_across_samples']:,}; "
            f"epochs {st['epochs_started']} (restarted {st['epochs_restarted']})"
        )
    return "\n".join(lines)


def balance_report(index, num_samples: int, cp: int, dp: int, gb: int, sharding: str) -> dict:
    """Per-step balance over the first whole global batches of ``num_samples`` samples."""
    from megatron_longctx.data.packing import sample_doc_lengths
    from megatron_longctx.parallel.dp_assign import (
        WorkModel,
        assign_variable,
        dp_lower_bound,
        megatron_order,
        step_balance,
    )

    model = WorkModel(cp, sharding)
    steps = num_samples // gb
    out = {"balanced": [], "megatron order": []}
    for g in range(steps):
        lengths = [sample_doc_lengths(index, g * gb + i) for i in range(gb)]
        per = [model.sample(x) for x in lengths]
        work = np.stack([w for w, _ in per])
        pads, toks = [p for _, p in per], [x.sum() for x in lengths]
        for name, order in (
            ("balanced", assign_variable(work.max(1), dp, 1)),
            ("megatron order", megatron_order(gb, dp, 1)),
        ):
            out[name].append(step_balance(work, pads, toks, order))
        # no assignment of whole samples can beat this (parallel/dp_assign.py)
        out["balanced"][-1]["dp_lower_bound"] = dp_lower_bound(work.max(1), dp)
    return out


def format_balance(res: dict, cp: int, dp: int, sharding: str) -> str:
    lines = [f"\nload balance over {len(res['balanced'])} steps (CP {cp}, DP {dp}, {sharding}):"]
    for name, rows in res.items():
        if not rows:
            continue
        figs = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        lines.append(
            f"  {name:15s} CP max/mean median {np.median(figs['cp_work_max_over_mean']):.4f} "
            f"worst {figs['cp_work_max_over_mean'].max():.4f} | DP max/mean median "
            f"{np.median(figs['dp_work_max_over_mean']):.4f} worst "
            f"{figs['dp_work_max_over_mean'].max():.4f} | padding "
            f"{100 * figs['padding_share'].mean():.3f}%"
            + (
                f" | DP bound worst {figs['dp_lower_bound'].max():.4f}"
                if "dp_lower_bound" in figs
                else ""
            )
        )
    return "\n".join(lines)


def plot(index, per_comp, per_bin, docs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in index.spec.components]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for b, label in enumerate(BIN_LABELS):
        share = per_bin[:, b] / per_comp.sum()
        if share.any():
            ax1.bar(x, share, bottom=bottom, label=f"docs {label}")
            bottom += share
    ax1.scatter(
        x,
        [c.weight for c in index.spec.components],
        color="k",
        marker="_",
        s=400,
        label="weight",
        zorder=3,
    )
    ax1.set_xticks(x, names, rotation=45, ha="right")
    ax1.set_ylabel("share of training tokens")
    ax1.set_title(f"realized vs weight over {len(docs)} samples of {index.seq_length:,}")
    ax1.legend(fontsize=7)
    ax2.hist(docs, bins=min(50, max(5, int(docs.max()))), color="tab:gray")
    ax2.set_xlabel("documents per sample")
    ax2.set_ylabel("samples")
    ax2.set_title("documents per packed sample")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixture", required=True, help="mixture YAML (examples/mixtures/)")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--num-samples", type=int, default=1000, help="samples to inspect")
    parser.add_argument(
        "--index-samples",
        type=int,
        default=None,
        help="samples the index is built for (default: --num-samples)",
    )
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=None, help="samples per step")
    parser.add_argument("--cp-sharding", default="balanced", help="balanced, document, sequence")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--png", default="mixture.png")
    args = parser.parse_args(argv)
    from megatron_longctx.data.index_cache import build_mixture_index
    from megatron_longctx.data.mixture import load_mixture_yaml

    spec = load_mixture_yaml(args.mixture)
    index = build_mixture_index(
        spec,
        args.seq_length,
        args.index_samples or args.num_samples,
        vocab_size=args.vocab_size,
        cp_size=args.context_parallel_size,
        cache_dir=args.cache_dir,
    )
    n = min(args.num_samples, index.num_samples)
    per_comp, per_bin, docs = realized_shares(index, n)
    print(format_report(index, per_comp, per_bin, docs))
    gb = args.global_batch_size or args.dp_size
    cp = args.context_parallel_size
    balance = balance_report(index, n, cp, args.dp_size, gb, args.cp_sharding)
    print(format_balance(balance, cp, args.dp_size, args.cp_sharding))
    plot(index, per_comp, per_bin, docs, Path(args.png))
    print(f"\nwrote {args.png}")
    return {
        "per_component": per_comp,
        "per_bin": per_bin,
        "docs_per_sample": docs,
        "balance": balance,
    }


if __name__ == "__main__":
    main()
