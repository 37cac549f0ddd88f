"""Mixture index build time and loader throughput vs megatron-core's GPTDataset, same data, same run.

    python benchmarks/bench_mixture.py [--num-docs 10000000] [--tokens 20e9] [--seq-length 65536]

Writes two synthetic indexed datasets (real ``.idx`` files; ``.bin`` files are sparse, so 80 GB of
token space costs no disk): a long one (documents >= 64K tokens) and a short one, together
``--num-docs`` documents and ``--tokens`` tokens. Then, on the same files and the same
``tokens / S`` samples with weights long 0.6 / short 0.4:

* ours: ``build_mixture_index`` (file checks, length buckets, blending, per-epoch shuffles, stream
  offsets), no cache;
* baseline: megatron-core ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` with
  ``path_to_cache=None`` (per-dataset document/sample/shuffle indices with its C++ helpers, then the
  blending index). Megatron has no length buckets; the buckets here keep every document, so both
  index the same documents.

Also reports loader throughput in packed S-token samples/s (ours: ``MixtureLoader`` micro-batches
with ``cu_seqlens``; baseline: ``BlendedDataset.__getitem__``), single process.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_synthetic(prefix: Path, lengths: np.ndarray) -> None:
    """Writes a valid int32 ``.idx`` for ``lengths`` and a sparse ``.bin`` of the right size."""
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 4, out=pointers[1:])
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write((1).to_bytes(8, "little") + bytes([4]))
        f.write(n.to_bytes(8, "little") + (n + 1).to_bytes(8, "little"))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 4)


def synthetic_lengths(num_docs: int, tokens: float, seed: int = 0):
    """Long documents (>= 64K, 60% of tokens) and short web-like documents (40%)."""
    rng = np.random.default_rng(seed)
    num_long = max(1, num_docs // 60)
    long = (65536 + rng.exponential(1.0, num_long) * 1.0).astype(np.int64)
    long = np.maximum(65536, (long / long.sum() * tokens * 0.6)).astype(np.int64)
    short = rng.lognormal(6.5, 1.0, num_docs - num_long)
    short = np.clip(short / short.sum() * tokens * 0.4, 1, 65535).astype(np.int64)
    return long, short


class _Tokenizer:
    """The three attributes GPTDataset reads from a tokenizer."""

    vocab_size = None
    eod = 0
    pad = 1
    unique_identifiers = {"class": "synthetic"}


def bench_megatron(prefixes, weights, seq_length, num_samples):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq_length,
        blend=([str(p) for p in prefixes], weights),
        split="100,0,0",
        path_to_cache=None,
        tokenizer=_Tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    start = time.perf_counter()
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, 0, 0], lambda: True, config
    ).build()
    return time.perf_counter() - start, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=10_000_000)
    parser.add_argument("--tokens", type=float, default=20e9)
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--loader-samples", type=int, default=200)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from megatron_longctx.data.index_cache import build_mixture_index
    from megatron_longctx.data.loader import MixtureLoader
    from megatron_longctx.data.mixture import MixtureComponent, MixtureSpec

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-mixture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    long, short = synthetic_lengths(args.num_docs, args.tokens)
    prefixes = [workdir / "long", workdir / "short"]
    write_synthetic(prefixes[0], long)
    write_synthetic(prefixes[1], short)
    total = int(long.sum() + short.sum())
    S = args.seq_length
    num_samples = total // S
    print(
        f"data: {len(long) + len(short):,} documents ({len(long):,} long), {total / 1e9:.2f}B "
        f"tokens; S={S:,}; {num_samples:,} samples; weights long 0.6 / short 0.4"
    )
    spec = MixtureSpec(
        [
            MixtureComponent("long", [str(prefixes[0])], 0.6, min_tokens=65536),
            MixtureComponent("short", [str(prefixes[1])], 0.4, max_tokens=65536),
        ]
    )
    ours_cache = workdir / "ours_cache"
    for stale in (ours_cache, *prefixes):  # megatron's default cache is {prefix}/cache/
        shutil.rmtree(stale, ignore_errors=True)  # both build from scratch and write a cache
    start = time.perf_counter()
    index = build_mixture_index(spec, S, num_samples, vocab_size=128256, cache_dir=ours_cache)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    build_mixture_index(spec, S, num_samples, vocab_size=128256)
    in_memory = time.perf_counter() - start
    start = time.perf_counter()
    build_mixture_index(spec, S, num_samples, vocab_size=128256, cache_dir=ours_cache)
    cached = time.perf_counter() - start
    theirs, blended = bench_megatron(prefixes, [0.6, 0.4], S, num_samples)
    print(
        f"index build + cache write: ours {ours:6.2f} s   megatron GPTDataset+Blended "
        f"{theirs:6.2f} s   speed-up {theirs / ours:5.2f}x   (target <= 5 s and >= 2x)"
    )
    print(f"ours without cache {in_memory:.2f} s; cached index load (memory-mapped) {cached:.3f} s")

    loader = MixtureLoader(index, 64, 1, 0, 1)
    n = args.loader_samples
    next(loader)
    start = time.perf_counter()
    docs = 0
    for _ in range(n):
        docs += len(next(loader)["cu_seqlens"]) - 1
    ours_tp = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(1, n + 1):
        blended[i]
    theirs_tp = n / (time.perf_counter() - start)
    print(
        f"loader        ours {ours_tp:7.1f} samples/s   megatron {theirs_tp:7.1f} samples/s   "
        f"ratio {ours_tp / theirs_tp:5.2f}x   ({S:,}-token samples, 1 process, "
        f"{docs / n:.1f} documents/sample; target >= 50/s per core)"
    )
    for st in index.stats["components"]:
        print(
            f"  {st['name']:6s} samples {st['samples']:,} epochs {st['epochs_started']} "
            f"carried {st['docs_carried_across_samples']:,} dropped "
            f"{st['docs_dropped_below_min'] + st['docs_dropped_above_max']:,}"
        )
    if args.workdir is None:
        for p in workdir.rglob("*"):
            if p.is_file():
                os.remove(p)


if __name__ == "__main__":
    main()
