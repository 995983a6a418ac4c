"""labkit.plots: every shared figure draws from records, whatever their status."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from labkit import plots  # noqa: E402


def row(label, s, gb, status="ok"):
    return {"label": label, "status": status, "s_per_image": s, "s_per_image_min": s, "s_per_image_max": s,
            "peak_allocated_gb": gb, "device": "test"}  # fmt: skip


def test_bar_and_tradeoff_mark_rows_without_numbers():
    records = [row("baseline", 4.0, 8.0), row("fast", 1.0, 2.0), {"label": "huge", "status": "oom"}]
    records.append({"label": "xformers", "status": "unavailable"})
    figure = plots.bar(records)
    assert len(figure.axes[0].patches) == 4
    assert "unavailable" in [t.get_text().strip() for t in figure.axes[0].texts]
    assert plots.tradeoff(records[:2]).axes[0].collections
    plt.close("all")


def test_lines_image_rows_flops_and_time_breakdown():
    rows = [{"sampler": s, "steps": n, "s_per_image": n * 0.1, "status": "ok"} for s in "AB" for n in (2, 4)]
    rows.append({"sampler": "C", "steps": 4, "s_per_image": None, "status": "oom"})
    fig = plots.lines(rows, "steps", "s_per_image", group="sampler", logx=True)
    assert len(fig.axes[0].lines) == 2
    fig = plots.image_rows(np.zeros((4, 8, 8, 3)), ["r1", "r2"], ["c1", "c2"], note="n")
    assert len(fig.axes) == 4
    cost = [
        {
            "label": "latent",
            "flops": 10.0,
            "flops_convolution": 6.0,
            "flops_attention": 1.0,
            "flops_linear": 3.0,
        },
        {
            "label": "pixel",
            "flops": 1e4,
            "flops_convolution": 400.0,
            "flops_attention": 9e3,
            "flops_linear": 200.0,
        },
    ]
    assert plots.flops_by_kind(cost).axes[0].get_yscale() == "log"
    breakdown = [
        {"label": "b1", "status": "ok", "batch": 1, "text_encoder_s": 0.1, "unet_s": 1.0, "attention_s": 0.3,
         "vae_decode_s": 0.2, "wall_s": 2.0, "busy_share": 0.6},
        {"label": "b2", "status": "ok", "batch": 2, "text_encoder_s": 0.1, "unet_s": 2.0, "attention_s": 0.5,
         "vae_decode_s": 0.4, "wall_s": 2.6, "busy_share": None},
    ]  # fmt: skip
    fig = plots.time_breakdown(breakdown)
    assert len(fig.axes[0].patches) == 10
    plt.close("all")
