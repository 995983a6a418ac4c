"""Figures drawn from result records (matplotlib). Every chapter's plots come from here."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

LABELS = {
    "s_per_image": "seconds per image",
    "peak_allocated_gb": "peak GPU memory (GB)",
    "images_per_s": "images per second",
    "utilisation": "share of the matmul peak",
}


def bar(records: list[dict], metric: str = "s_per_image", *, title: str | None = None, ax=None):
    """A horizontal bar per record for ``metric``, with the min-max spread for times; OOM rows marked."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.45 * len(records) + 1.2))
    labels = [r["label"] for r in records]
    values = [r.get(metric) if r["status"] != "oom" else None for r in records]
    heights = [v if v is not None else 0.0 for v in values]
    errors = None
    if metric == "s_per_image":
        errors = np.array(
            [
                [r["s_per_image"] - r["s_per_image_min"], r["s_per_image_max"] - r["s_per_image"]]
                if r["status"] != "oom"
                else [0.0, 0.0]
                for r in records
            ]
        ).T
    ax.barh(labels, heights, xerr=errors, color="tab:blue", capsize=3)
    for y, (value, r) in enumerate(zip(values, records, strict=True)):
        ax.text(heights[y], y, "  out of memory" if r["status"] == "oom" else f"  {value:.3g}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel(LABELS.get(metric, metric))
    ax.set_title(title or f"{LABELS.get(metric, metric)} on {records[0]['device']}" if records else "")
    ax.margins(x=0.25)
    return ax.figure


def tradeoff(records: list[dict], x: str = "peak_allocated_gb", y: str = "s_per_image", *, ax=None):
    """One point per record in the (memory, time) plane: down and left is better."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    for r in records:
        if r["status"] != "oom" and r.get(x) is not None and r.get(y) is not None:
            ax.scatter(r[x], r[y])
            ax.annotate(r["label"], (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    return ax.figure


def image_grid(
    images: np.ndarray, titles: list[str] | None = None, *, columns: int = 4, note: str | None = None
):
    """Show images (N, H, W, 3) in [0, 1] in a grid; ``note`` goes under it (say so when they are twin noise)."""
    images = np.nan_to_num(np.asarray(images))
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.2 * rows + (0.4 if note else 0)), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].clip(0, 1))
            if titles:
                ax.set_title(titles[i], fontsize=8)
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=9, style="italic")
    return fig
