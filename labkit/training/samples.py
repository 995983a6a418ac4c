"""The sample page of the shapes data or of a trained pipeline: one image per prompt kind.

``labkit/shapes/samples.png`` is this page for the shipped model, drawn after training it::

    from labkit.models import load_pipeline
    from labkit.training.samples import sample_page

    sample_page(load_pipeline("shapes"), path="labkit/shapes/samples.png")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labkit.models import generate
from labkit.quality import DEFAULT_GUIDANCE, DEFAULT_STEPS
from labkit.shapes import data


def page_prompts() -> list[str]:
    """All 270 prompts in page order: rows = (shape, colour), columns = (size, position)."""
    return [
        data.make_prompt(shape, color, position, size)
        for shape in data.SHAPES
        for color in data.COLORS
        for size in data.SIZES
        for position in data.POSITIONS
    ]


def sample_page(
    pipe=None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    title: str | None = None,
    path: str | Path | None = None,
    images: np.ndarray | None = None,
    dpi: int = 110,
):
    """One image for every prompt kind on one page (15 rows of shape x colour, 18 columns of size x position).

    With ``pipe`` the images are generated (image ``i`` from seed ``seed + i``, `labkit.models.generate`;
    the model's own settings, 20 steps and guidance 4, unless given); without, they are real procedural
    images, for comparison; or pass ``images`` in `page_prompts` order. Returns the matplotlib Figure (also
    saved to ``path`` if given).
    """
    import matplotlib.pyplot as plt

    prompts = page_prompts()
    if images is None:
        if pipe is None:
            images = data.images_for_prompts(prompts, seed=seed, split="test")
            title = title or "real images (the procedural data)"
        else:
            images = generate(
                pipe, prompts, seed=seed, chunk=100,
                steps=DEFAULT_STEPS if steps is None else steps,
                guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
            )  # fmt: skip
    rows = len(data.SHAPES) * len(data.COLORS)
    cols = len(data.SIZES) * len(data.POSITIONS)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.75, rows * 0.75 + 0.9), squeeze=False)
    for i, (ax, image) in enumerate(zip(axes.flat, images, strict=True)):
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        r, c = divmod(i, cols)
        if r == 0:
            size, position = data.SIZES[c // len(data.POSITIONS)], data.POSITIONS[c % len(data.POSITIONS)]
            ax.set_title(f"{size}\n{position}", fontsize=6)
        if c == 0:
            shape, color = data.SHAPES[r // len(data.COLORS)], data.COLORS[r % len(data.COLORS)]
            ax.set_ylabel(f"{color}\n{shape}", fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(
        left=0.06, right=0.995, bottom=0.005, top=0.93 if title else 0.95, wspace=0.05, hspace=0.05
    )
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
