"""Document-length statistics and the ``{prefix}_{key}_stats.json`` sidecar.

Lengths are in tokens as stored in the ``.bin`` (EOD included when ``--append-eod``). The histogram
has power-of-two buckets: key ``"2^k"`` counts documents with ``2^k <= length < 2^(k+1)``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_longctx.data.preprocess.writer import temp_path


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Power-of-two histogram of positive lengths, keyed ``"1"``, ``"2"``, ``"4"``... (bucket
    floor)."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return {}
    if int(lengths.min()) <= 0:
        raise ValueError("document lengths must be positive")
    exponents = np.floor(np.log2(lengths.astype(np.float64))).astype(np.int64)
    # guard float rounding right at powers of two
    exponents += (np.left_shift(1, exponents + 1) <= lengths).astype(np.int64)
    exponents -= (np.left_shift(1, exponents) > lengths).astype(np.int64)
    counts = np.bincount(exponents)
    return {str(1 << k): int(c) for k, c in enumerate(counts) if c}


def summarize_lengths(lengths: np.ndarray) -> dict:
    """Documents, tokens, min/median/max/mean length and the power-of-two histogram."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return {
            "documents": 0,
            "tokens": 0,
            "min_length": None,
            "median_length": None,
            "max_length": None,
            "mean_length": None,
            "length_histogram": {},
        }
    return {
        "documents": int(lengths.size),
        "tokens": int(lengths.sum(dtype=np.int64)),
        "min_length": int(lengths.min()),
        "median_length": float(np.median(lengths)),
        "max_length": int(lengths.max()),
        "mean_length": float(lengths.mean(dtype=np.float64)),
        "length_histogram": length_histogram(lengths),
    }


def write_json_atomic(path: str, payload: dict) -> str:
    """Writes ``payload`` as JSON under a temporary name and returns that name (rename it to
    commit)."""
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    return tmp


def plot_histogram(histogram: dict[str, int], title: str, path: str) -> str:
    """Writes the histogram as a PNG under a temporary name and returns that name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = sorted(histogram, key=int)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(buckets)), [histogram[b] for b in buckets])
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels([_human(int(b)) for b in buckets], rotation=45)
    ax.set_xlabel("document length (tokens, bucket floor)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    fig.tight_layout()
    tmp = temp_path(path)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    return tmp


def _human(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n // size}{unit}"
    return str(n)


def remove_quietly(path: str) -> None:
    """Deletes ``path`` if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
