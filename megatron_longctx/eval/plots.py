"""PNG plots of evaluation results (matplotlib, headless Agg backend)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def needle_heatmap(
    grid: list[list[float | None]],
    lengths: list[int],
    depths: list[float],
    path: str,
    title: str = "needle in a haystack",
) -> None:
    """Accuracy heatmap: rows are depths, columns context lengths; skipped cells are grey."""
    plt = _pyplot()
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (r, c), v in np.ndenumerate(data):
        ax.text(c, r, "skip" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact match")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_plot(result: dict, path: str, title: str = "loss by position") -> None:
    """Per-position loss (smoothed) and bucket means against token position (log x axis)."""
    plt = _pyplot()
    per = np.asarray(result["per_position"])
    window = max(1, len(per) // 64)
    smooth = np.convolve(per, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        np.arange(len(smooth)) + 1 + (window - 1) / 2,
        smooth,
        lw=1,
        alpha=0.6,
        label=f"per position (mean of {window})",
    )
    edges = result["bucket_edges"]
    mids = [(a + b) / 2 + 1 for a, b in zip(edges[:-1], edges[1:])]
    ax.plot(mids, result["bucket_loss"], "o-", label="bucket mean")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
