"""Tiny indexed datasets written with megatron-core's own IndexedDatasetBuilder (random tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_indexed(
    prefix: str | Path, doc_lengths: list[int], vocab: int, seed: int = 0, eod: int | None = None
) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.int32 if vocab > 65535 else np.uint16  # megatron's rule (Llama 3: int32)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for n in doc_lengths:
        doc = rng.integers(1, vocab, size=n)
        if eod is not None:
            doc[-1] = eod
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [n])
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_corpus(root: str | Path, vocab: int = 512, seed: int = 0) -> dict[str, str]:
    """A long domain (documents of 1.1K-3K tokens) and a short one (20-200 tokens)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    return {
        "long": write_indexed(root / "long", rng.integers(1100, 3000, 40).tolist(), vocab, seed),
        "short": write_indexed(
            root / "short", rng.integers(20, 200, 400).tolist(), vocab, seed + 1
        ),
    }


def two_component_index(data: dict[str, str], seq: int, global_batch: int, long_weight: float):
    """A mixture index over ``tiny_corpus``'s domains: "long" (documents >= ``seq`` tokens only)
    with weight ``long_weight`` and "short" with the rest (mixture seed 3, vocab 512)."""
    from megatron_longctx.data.index_cache import build_mixture_index
    from megatron_longctx.data.mixture import mixture_from_dict

    spec = mixture_from_dict(
        {
            "seed": 3,
            "components": [
                {
                    "name": "long",
                    "prefixes": [data["long"]],
                    "weight": long_weight,
                    "min_tokens": seq,
                },
                {"name": "short", "prefixes": [data["short"]], "weight": 1 - long_weight},
            ],
        }
    )
    return build_mixture_index(spec, seq, global_batch, vocab_size=512)
