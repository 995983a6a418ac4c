"""Procedural shapes data: seeded images of one coloured shape on a dark background, each with a prompt.

One image shows one shape with four attributes, drawn from a deliberately small space so that a tiny
text-to-image model can learn it on a CPU:

- ``shape``: circle, square, triangle (3)
- ``color``: red, green, blue, yellow, purple (5)
- ``position``: a cell of a 3x3 grid, "top left" ... "bottom right" (9)
- ``size``: small or large (2)

That is 270 attribute combinations. Each image also has nuisance variation that no prompt names (a jitter
of 2 pixels in position, of under a pixel in size, of a few percent in colour and in the background),
so that FID has a real distribution to compare and a model cannot just memorise 270 pictures.

The prompt reads "a small red circle at the top left". Rendering is vectorised numpy with anti-aliased edges
(a clipped signed distance), so a batch of 256 images takes a few milliseconds.

The held-out split is fixed: ``split="test"`` draws from its own seed stream, disjoint from ``"train"``.
Used by the trainers and, through :mod:`labkit.quality`, by every chapter that measures quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SIZES = ("small", "large")

#: attribute name -> the values it takes, in label order (the classifier's heads use this order)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "position": POSITIONS,
    "size": SIZES,
}

RGB = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.65, 0.20, 0.85),
}
# the phrase a prompt uses for each grid cell
POSITION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# "radius" (half-width) in pixels at 64 px; the two ranges never overlap, even after jitter
SIZE_RADIUS = {"small": 5.5, "large": 10.0}
GRID_CENTERS = (12.0, 32.0, 52.0)

# separate seed streams: the test split can never collide with the training split
_SPLIT_KEY = {"train": 0, "test": 1}


@dataclass
class ShapesBatch:
    """A batch of images (float32 NHWC in [0, 1]), their prompts, and integer labels per attribute."""

    images: np.ndarray
    prompts: list[str]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)


def make_prompt(shape: str, color: str, position: str, size: str) -> str:
    """The English prompt for one set of attributes, e.g. "a small red circle at the top left"."""
    return f"a {size} {color} {shape} {POSITION_PHRASE[position]}"


def all_prompts() -> list[str]:
    """Every prompt the data can produce (270), in label order."""
    return [
        make_prompt(shape, color, position, size)
        for shape in SHAPES
        for color in COLORS
        for position in POSITIONS
        for size in SIZES
    ]


_PHRASE_TO_POSITION = {phrase: position for position, phrase in POSITION_PHRASE.items()}


def parse_prompt(prompt: str) -> dict[str, str]:
    """Invert :func:`make_prompt`: "a small red circle at the top left" -> {"shape": "circle", ...}.

    Raises ``ValueError`` on a prompt the data cannot produce. Used by :func:`labkit.quality.prompt_accuracy`.
    """
    words = prompt.strip().lower().split()
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    size, color, shape = words[1], words[2], words[3]
    position = _PHRASE_TO_POSITION.get(" ".join(words[4:]))
    if size not in SIZES or color not in COLORS or shape not in SHAPES or position is None:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    return {"shape": shape, "color": color, "position": position, "size": size}


def prompt_labels(prompts: list[str]) -> dict[str, np.ndarray]:
    """Integer labels per attribute for a list of prompts (the classifier's targets)."""
    parsed = [parse_prompt(p) for p in prompts]
    return {
        name: np.array([values.index(p[name]) for p in parsed], dtype=np.int64)
        for name, values in ATTRIBUTES.items()
    }


def render(labels: dict[str, np.ndarray], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image per row of ``labels`` (integer labels per attribute); returns float32 NHWC in [0, 1].

    The nuisance jitter (position, size, colour, background) comes from ``rng``.
    """
    n = len(labels["shape"])
    scale = size / IMAGE_SIZE
    row, col = np.divmod(labels["position"], 3)
    centers = np.array(GRID_CENTERS) * scale
    cy = centers[row] + rng.uniform(-2.0, 2.0, n) * scale
    cx = centers[col] + rng.uniform(-2.0, 2.0, n) * scale
    radius = np.array([SIZE_RADIUS[s] for s in SIZES])[labels["size"]] + rng.uniform(-0.75, 0.75, n)
    radius = radius * scale

    # pixel-centre coordinates relative to each shape's centre: (n, size, size)
    coords = np.arange(size, dtype=np.float32) + 0.5
    dy = coords[None, :, None] - cy[:, None, None].astype(np.float32)
    dx = coords[None, None, :] - cx[:, None, None].astype(np.float32)
    r = radius[:, None, None].astype(np.float32)

    # signed distance (in pixels, negative inside) for each kind of shape
    circle = np.sqrt(dx * dx + dy * dy) - r
    square = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r  # same area as the circle, roughly
    # an upward equilateral triangle (circumradius 1.15 r, centred on its centroid): the max of three
    # half-plane distances, each edge at the inradius (half the circumradius) from the centre
    edge = 0.5 * 1.15 * r
    s60, c60 = np.float32(np.sin(np.pi / 3)), np.float32(0.5)
    triangle = np.maximum(np.maximum(dy - edge, s60 * dx - c60 * dy - edge), -s60 * dx - c60 * dy - edge)
    kind = labels["shape"][:, None, None]
    sdf = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]  # anti-aliased coverage, (n, size, size, 1)

    palette = np.array([RGB[c] for c in COLORS], dtype=np.float32)
    color = palette[labels["color"]] + rng.uniform(-0.05, 0.05, (n, 3)).astype(np.float32)
    background = rng.uniform(0.08, 0.18, (n, 1)).astype(np.float32) + rng.uniform(-0.02, 0.02, (n, 3)).astype(
        np.float32
    )
    images = alpha * color[:, None, None, :] + (1.0 - alpha) * background[:, None, None, :]
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def sample(n: int, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE) -> ShapesBatch:
    """Draw ``n`` random images with their prompts, deterministic in (seed, split).

    Used by the training loop and the quality metrics.
    """
    if split not in _SPLIT_KEY:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([_SPLIT_KEY[split], seed])
    labels = {name: rng.integers(0, len(values), n) for name, values in ATTRIBUTES.items()}
    images = render(labels, rng, size=size)
    prompts = [
        make_prompt(SHAPES[s], COLORS[c], POSITIONS[p], SIZES[z])
        for s, c, p, z in zip(
            labels["shape"], labels["color"], labels["position"], labels["size"], strict=True
        )
    ]
    return ShapesBatch(images=images, prompts=prompts, labels=labels)


def images_for_prompts(
    prompts: list[str], seed: int = 0, split: str = "test", size: int = IMAGE_SIZE
) -> np.ndarray:
    """Real images that match given prompts (fresh nuisance jitter from ``seed``), float32 NHWC in [0, 1]."""
    rng = np.random.default_rng([_SPLIT_KEY[split], 10_000 + seed])
    return render(prompt_labels(prompts), rng, size=size)


def heldout(n: int = 500, seed: int = 0) -> ShapesBatch:
    """The fixed held-out set: ``n`` test-split images and prompts. Used by :func:`labkit.quality.evaluate`."""
    return sample(n, seed=seed, split="test")


def batches(batch_size: int, seed: int = 0, split: str = "train"):
    """An endless iterator of fresh training batches (on-the-fly data; seed ``seed``, ``seed + 1``, ...)."""
    step = 0
    while True:
        yield sample(batch_size, seed=seed * 1_000_003 + step, split=split)
        step += 1
