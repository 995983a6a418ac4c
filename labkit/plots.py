"""Figures drawn from records (matplotlib): bars, lines, fit maps, image grids. Every chapter draws here.

A figure that only one chapter needs lives in that chapter's module; these are the shared ones.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from labkit.measurement import break_even_images, compile_seconds, measured

LABELS = {
    "s_per_image": "seconds per image",
    "peak_allocated_gb": "peak GPU memory (GB)",
    "images_per_s": "images per second",
    "utilisation": "share of the matmul peak",
}


def bar(records: list[dict], metric: str = "s_per_image", *, title: str | None = None, ax=None):
    """A horizontal bar per record for ``metric``, with the min-max spread for times; rows without
    measurements (out of memory, unavailable here) are marked with their status."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.45 * len(records) + 1.2))
    labels = [r["label"] for r in records]
    values = [r.get(metric) if measured(r) else None for r in records]
    heights = [v if v is not None else 0.0 for v in values]
    errors = None
    if metric == "s_per_image":
        errors = np.array(
            [
                [r["s_per_image"] - r["s_per_image_min"], r["s_per_image_max"] - r["s_per_image"]]
                if measured(r)
                else [0.0, 0.0]
                for r in records
            ]
        ).T
    ax.barh(labels, heights, xerr=errors, color="tab:blue", capsize=3)
    for y, (value, r) in enumerate(zip(values, records, strict=True)):
        if value is not None:
            text = f"  {value:.3g}"
        else:
            text = "  out of memory" if r["status"] == "oom" else f"  {r['status']}"
        ax.text(heights[y], y, text, va="center")
    ax.invert_yaxis()
    ax.set_xlabel(LABELS.get(metric, metric))
    ax.set_title(
        title or f"{LABELS.get(metric, metric)} on {records[0].get('device', '?')}" if records else ""
    )
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


# ===================================================================================================
# Fits under memory caps, grouped bars, the break-even of compiling
# ===================================================================================================

STATUS_COLOURS = {
    "ok": "#4c9a4c",
    "oom": "#c0504d",
    "unavailable": "#b0b0b0",
    "error": "#e0a030",
    "nan": "#e0a030",
}
"""Cell and bar colours of the Tier 2 figures, by record status."""


def _cap_name(cap) -> str:
    return "no cap" if cap is None else f"{cap:g} GB"


def fit_map(records: list[dict], *, title: str | None = None, ax=None):
    """Which configuration fits under which GPU memory cap, and at which speed (chapter 4).

    One row per configuration, one column per (size, cap); a cell is green when the configuration
    ran (seconds per image and peak GB written in it; "as under" names the smaller cap it was
    measured under), red when it ran out of memory, grey when it cannot run on this device. Drawn
    from `labkit.scenarios.grid` records.
    """
    labels = list(dict.fromkeys(r["label"] for r in records))
    columns = list(dict.fromkeys((r.get("size"), r.get("memory_cap_gb")) for r in records))
    if ax is None:
        _, ax = plt.subplots(figsize=(1.9 * max(1, len(columns)) + 3, 0.5 * max(1, len(labels)) + 1.4))
    if not records:
        ax.text(0.5, 0.5, "no records to draw", ha="center", va="center")
        ax.axis("off")
        return ax.figure
    cells = {(r["label"], (r.get("size"), r.get("memory_cap_gb"))): r for r in records}
    for y, label in enumerate(labels):
        for x, column in enumerate(columns):
            r = cells.get((label, column))
            if r is None:
                continue
            ax.add_patch(
                plt.Rectangle(
                    (x, y), 1, 1, facecolor=STATUS_COLOURS.get(r["status"], "white"), edgecolor="white"
                )
            )
            if r["status"] == "ok":
                text = f"{r['s_per_image']:.3g} s"
                if r.get("peak_allocated_gb") is not None:
                    text += f"\n{r['peak_allocated_gb']:.2g} GB"
                if r.get("measured_under_gb") not in (None, r.get("memory_cap_gb")):
                    text += f"\n(as under {r['measured_under_gb']:g} GB)"
            else:
                text = {"oom": "out of\nmemory", "unavailable": "unavailable\nhere"}.get(
                    r["status"], r["status"]
                )
            ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(columns))
    ax.set_ylim(len(labels), 0)
    ax.set_xticks([x + 0.5 for x in range(len(columns))])
    ax.set_xticklabels([f"{size} px\n{_cap_name(cap)}" for size, cap in columns], fontsize=8)
    ax.set_yticks([y + 0.5 for y in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title or f"which configurations fit, on {records[0].get('device', '?')}")
    return ax.figure


def grouped_bars(
    records: list[dict], metric: str = "s_per_image", *, by: str = "size", title: str | None = None, ax=None
):
    """One group of horizontal bars per configuration, one bar per value of ``by`` (chapters 4-6).

    Records that did not run (out of memory, unavailable, failed) get an empty bar and their status
    as text, so no configuration disappears from the figure.
    """
    labels = list(dict.fromkeys(r["label"] for r in records))
    groups = list(dict.fromkeys(r.get(by) for r in records))
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 0.3 * len(labels) * max(1, len(groups)) + 1.5))
    height = 0.8 / max(1, len(groups))
    values = {(r["label"], r.get(by)): r for r in records}
    top = max([r.get(metric) or 0 for r in records if r["status"] == "ok"] + [0])
    for g, group in enumerate(groups):
        ys, widths = [], []
        for y, label in enumerate(labels):
            r = values.get((label, group))
            if r is None:
                continue
            value = r.get(metric) if r["status"] == "ok" else None
            position = y + (g - (len(groups) - 1) / 2) * height
            ys.append(position)
            widths.append(value or 0.0)
            if value is not None:
                note = f" {value:.3g}"
            else:
                note = " not measured" if r["status"] == "ok" else f" {r['status']}"
            ax.text(value or 0.0, position, note, va="center", fontsize=7)
        ax.barh(ys, widths, height=height * 0.95, label=f"{by} {group}")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.3 if top else 1)
    ax.set_xlabel(LABELS.get(metric, metric))
    if len(groups) > 1:
        ax.legend(fontsize=8, loc="lower right")
    device = records[0].get("device", "?") if records else "?"
    ax.set_title(title or f"{LABELS.get(metric, metric)} on {device}")
    return ax.figure


LABELS.setdefault("attention_share", "share of UNet time spent in attention")
LABELS.setdefault("attention_s", "seconds in attention per image generation")


def break_even(records: list[dict], reference: str, *, images: int | None = None, ax=None):
    """Total time against the number of images, compile time included, per configuration (chapter 6).

    Each line starts at the configuration's compile time (`labkit.measurement.compile_seconds`) and grows
    by its seconds per image; where a compiled line crosses the ``reference`` line, compiling has paid
    for itself.
    """
    ran = [r for r in records if r["status"] == "ok"]
    ref = next((r for r in ran if r["label"] == reference), None)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.2))
    if ref is None or not ran:
        ax.text(0.5, 0.5, "nothing to draw: the reference did not run", ha="center", va="center")
        ax.axis("off")
        return ax.figure
    if images is None:
        finite = [
            n for r in ran if r is not ref and (n := break_even_images(ref, r)) not in (None, float("inf"))
        ]
        images = int(max(finite, default=10) * 2) + 1
    n = np.arange(images + 1)
    for r in ran:
        start = compile_seconds(r) - (compile_seconds(ref) if r is not ref else 0)
        ax.plot(n, max(0.0, start) + n * r["s_per_image"], label=r["label"], lw=2.5 if r is ref else 1.5)
    ax.set_xlabel("images generated")
    ax.set_ylabel("total seconds (compile included)")
    ax.legend(fontsize=8)
    ax.set_title(f"when compiling pays off, on {ref.get('device', '?')}")
    return ax.figure


# ---------------------------------------------------------------------------------------------------
# Lines, image rows, FLOPs by kind, time by region
# ---------------------------------------------------------------------------------------------------


def lines(
    records: list[dict],
    x: str,
    y: str,
    *,
    group: str = "label",
    ax=None,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    xlabel: str | None = None,
    ylabel: str | None = None,
):
    """One line per value of ``group``: ``y`` against ``x`` (prompt accuracy against steps per sampler,
    seconds per image against batch size per precision). Records whose status is not ``ok`` are left out.
    Used in the samplers and numerics chapters."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    groups: dict = {}
    for r in records:
        if r.get("status") == "ok" and r.get(x) is not None and r.get(y) is not None:
            groups.setdefault(r.get(group), []).append((r[x], r[y]))
    for name, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(name))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or LABELS.get(x, x))
    ax.set_ylabel(ylabel or LABELS.get(y, y))
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    return ax.figure


def image_rows(
    images: np.ndarray, row_labels: list[str], column_labels: list[str], *, note: str | None = None
):
    """Images (N, H, W, 3) in [0, 1], row-major, in a grid with a label per row and a title per column.

    Used in the samplers chapter (a row per sampler, a column per prompt) and the latent diffusion chapter.
    """
    import textwrap

    images = np.asarray(images)
    rows, columns = len(row_labels), len(column_labels)
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns + 1.2, 1.6 * rows + (0.4 if note else 0) + 0.4), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if i < len(images):
            ax.imshow(np.nan_to_num(images[i]).clip(0, 1), interpolation="nearest")
        r, c = divmod(i, columns)
        if r == 0:
            ax.set_title(textwrap.fill(column_labels[c], 22), fontsize=7)
        if c == 0:
            ax.set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center")
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    return fig


def flops_by_kind(
    records: list[dict],
    *,
    kinds: tuple[str, ...] = ("convolution", "attention", "linear"),
    ax=None,
    title=None,
):
    """Grouped bars, log scale: the FLOPs of each kind (``flops_<kind>`` fields) and the total, per record.

    Used in the latent diffusion chapter (pixel-space against latent-space UNet).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.8))
    names = [*kinds, "total"]
    width = 0.8 / max(1, len(records))
    for i, r in enumerate(records):
        values = [r.get(f"flops_{k}", 0) for k in kinds] + [r["flops"]]
        xs = np.arange(len(names)) + i * width
        ax.bar(xs, [max(v, 1) for v in values], width, label=r["label"])
        for xpos, v in zip(xs, values, strict=True):
            ax.text(xpos, max(v, 1), f"{v / 1e9:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)) + width * (len(records) - 1) / 2, names)
    ax.set_yscale("log")
    ax.set_ylabel("FLOPs per UNet evaluation (labels: GFLOP)")
    ax.set_title(title or "where the FLOPs are")
    ax.legend(fontsize=8)
    return ax.figure


def time_breakdown(records: list[dict], *, ax=None, title: str | None = None):
    """One stacked bar per record: seconds per image in the text encoder, the UNet outside attention,
    attention, the VAE decode, and the rest of the wall time (on a GPU: time no kernel ran, i.e. launch
    gaps). Annotated with the GPU busy share when the record has one. Records come from
    `labkit.profiling.time_breakdown`."""
    records = [r for r in records if r.get("status") == "ok"]
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 0.5 * len(records) + 1.5))
    parts = ["text encoder", "UNet (not attention)", "attention", "VAE decode", "rest of the wall time"]
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "white"]
    for y, r in enumerate(records):
        batch = r.get("batch") or 1
        values = [
            r["text_encoder_s"],
            r["unet_s"] - r["attention_s"],
            r["attention_s"],
            r["vae_decode_s"],
        ]
        values.append(max(0.0, r["wall_s"] - sum(values)))
        left = 0.0
        for part, value, color in zip(parts, values, colors, strict=True):
            ax.barh(y, value / batch, left=left, color=color, edgecolor="black", linewidth=0.4,
                    label=part if y == 0 else None)  # fmt: skip
            left += value / batch
        if r.get("busy_share") is not None:
            ax.text(left, y, f"  GPU busy {r['busy_share']:.0%}", va="center", fontsize=8)
    ax.set_yticks(range(len(records)), [r["label"] for r in records])
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image")
    ax.set_title(title or "where the time goes")
    ax.legend(fontsize=7, loc="lower right")
    ax.margins(x=0.2)
    return ax.figure
