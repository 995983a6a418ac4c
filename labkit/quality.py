"""Quality metrics on the ``shapes`` model: prompt accuracy, FID with our own features, PSNR.

Only on the shapes model do quality numbers mean something (the twins draw noise, hub weights cannot be
downloaded here). A small CNN, trained on the procedural data (:mod:`labkit.shapes.data`) with one head per
attribute (shape, colour, position, size), gives:

- :func:`prompt_accuracy`: the fraction of images whose every attribute matches their prompt (the
  per-attribute numbers come from :func:`attribute_accuracy`);
- :func:`fid`: Frechet distance between the classifier's 128-d embeddings of two image sets, computed by
  torchmetrics' ``FrechetInceptionDistance(feature=ShapesFeatures(...))``. Inception features would need a
  download, and on 64 px shape drawings they would measure the wrong thing anyway. Our FID is on its own
  scale: compare it between configurations, never with published Inception FIDs;
- :func:`psnr`: the pixel difference between two configurations run with the same seeds ("does fp16
  change the picture");
- :func:`wilson_interval`: the 95% interval of an accuracy measured on ``n`` images.

:func:`evaluate` wraps them for a pipeline. Images everywhere are float numpy arrays in [0, 1], NHWC (what a
diffusers pipeline returns with ``output_type="np"``); torch tensors NCHW in [0, 1] work too. The
classifier is trained by `labkit.training.classifier` (``labkit train classifier``).
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from labkit.models import generate, native_size
from labkit.shapes import CLASSIFIER_PATH
from labkit.shapes import data as shapes_data

# ----------------------------------------------------------------------------------------------------------
# the classifier


class ShapesClassifier(nn.Module):
    """A small CNN with one linear head per attribute; ``embed`` gives the 128-d features used for FID.

    Input: float NCHW images in [0, 1], 64x64. Four stride-2 convolutions bring 64 px to 4x4; the 4x4 map is
    flattened (not pooled) so that the embedding knows where the shape is.
    """

    def __init__(self, width: int = 32, num_features: int = 128, image_size: int = shapes_data.IMAGE_SIZE):
        super().__init__()
        self.config = {"width": width, "num_features": num_features, "image_size": image_size}
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w, 2),  # 32
            block(w, 2 * w, 2),  # 16
            block(2 * w, 2 * w, 2),  # 8
            block(2 * w, 2 * w, 2),  # 4
        )
        side = image_size // 16
        self.embedding = nn.Linear(2 * w * side * side, num_features)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(num_features, len(values)) for name, values in shapes_data.ATTRIBUTES.items()}
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The 128-d embedding (before its activation) of NCHW images in [0, 1]."""
        x = self.body(images * 2.0 - 1.0)
        return self.embedding(x.flatten(1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute."""
        h = F.silu(self.embed(images))
        return {name: head(h) for name, head in self.heads.items()}


class ShapesFeatures(nn.Module):
    """The classifier's embedding as a torchmetrics FID feature extractor (``num_features`` = 128).

    Takes float NCHW images in [0, 1] (use ``FrechetInceptionDistance(..., normalize=True)``) or uint8.
    """

    def __init__(self, classifier: ShapesClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config["num_features"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = images.to(next(self.classifier.parameters()).device, torch.float32)
        return self.classifier.embed(images)


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """NHWC numpy (or NCHW tensor) in [0, 1] -> float32 NCHW tensor."""
    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


@lru_cache(maxsize=4)
def _cached_classifier(path: str, device: str) -> ShapesClassifier:
    config = json.loads(Path(path).with_suffix(".json").read_text())
    model = ShapesClassifier(config["width"], config["num_features"], config["image_size"])
    model.load_state_dict(load_file(path))
    return model.to(device).eval()


def load_classifier(path: str | Path | None = None, device: str = "cpu") -> ShapesClassifier:
    """The shipped shapes classifier (``CLASSIFIER_PATH`` + ``CLASSIFIER_CONFIG_PATH``), in eval mode.

    The config sits beside the weights: ``classifier.safetensors`` + ``classifier.json``.
    """
    path = CLASSIFIER_PATH if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: train it with `labkit train classifier --export labkit/shapes`"
        )
    return _cached_classifier(str(path), str(device))


# ----------------------------------------------------------------------------------------------------------
# metrics


@torch.no_grad()
def predict(
    images: np.ndarray | torch.Tensor, classifier: ShapesClassifier | None = None, batch_size: int = 256
):
    """Predicted integer label per attribute for each image: {"shape": array(N), "color": ..., ...}."""
    classifier = classifier or load_classifier()
    device = next(classifier.parameters()).device
    x = to_tensor(images)
    out: dict[str, list[np.ndarray]] = {k: [] for k in shapes_data.ATTRIBUTES}
    for i in range(0, len(x), batch_size):
        logits = classifier(x[i : i + batch_size].to(device))
        for k in out:
            out[k].append(logits[k].argmax(1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def attribute_accuracy_with(classifier, images, labels: dict[str, np.ndarray]) -> dict[str, float]:
    pred = predict(images, classifier)
    correct = {k: pred[k] == labels[k] for k in shapes_data.ATTRIBUTES}
    result = {k: float(v.mean()) for k, v in correct.items()}
    result["all"] = float(np.logical_and.reduce(list(correct.values())).mean())
    return result


def attribute_accuracy(
    images: np.ndarray | torch.Tensor, prompts: list[str], classifier: ShapesClassifier | None = None
) -> dict[str, float]:
    """Accuracy per attribute ("shape", "color", "position", "size") and "all" (every attribute right)."""
    return attribute_accuracy_with(
        classifier or load_classifier(), images, shapes_data.prompt_labels(prompts)
    )


def prompt_accuracy(
    images: np.ndarray | torch.Tensor, prompts: list[str], classifier: ShapesClassifier | None = None
) -> float:
    """The fraction of images whose every attribute (shape, colour, position, size) matches the prompt:
    the lab's "does it still draw what was asked"."""
    return attribute_accuracy(images, prompts, classifier)["all"]


def fid(
    real_images: np.ndarray | torch.Tensor,
    fake_images: np.ndarray | torch.Tensor,
    classifier: ShapesClassifier | None = None,
    batch_size: int = 256,
) -> float:
    """FID between two image sets with the shapes classifier's features (torchmetrics, float64 statistics).

    Lower is better; 0 only for identical feature statistics. Two independent sets of *real* images still
    score above 0 (finite-sample bias): about 16 at 600 images per side, 5.5 at 2000, while the same real
    images with their colour channels rotated score about 65. Compare configurations at equal ``n``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    features = ShapesFeatures(classifier or load_classifier())
    metric = FrechetInceptionDistance(feature=features, normalize=True)
    for images, real in ((real_images, True), (fake_images, False)):
        x = to_tensor(images)
        for i in range(0, len(x), batch_size):
            metric.update(x[i : i + batch_size], real=real)
    return float(metric.compute())


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean PSNR in dB between two image sets in [0, 1] (pairwise, e.g. fp32 vs fp16 with the same seeds).

    Identical pairs count as 100 dB: "does fp16 change the picture".
    """
    a = to_tensor(a).double()
    b = to_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(1)
    values = [100.0 if m == 0 else min(100.0, 10 * math.log10(1.0 / m)) for m in mse.tolist()]
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------------------
# a pipeline end to end

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
"""The shapes model's own sampling settings (DPM-Solver++ at 20 steps, guidance 4): what it was tuned for."""


def evaluate(
    pipe,
    n: int = 500,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = 100,
    return_images: bool = False,
    **kwargs,
) -> dict:
    """Generate for ``n`` held-out prompts with the pipeline's current scheduler and score the images.

    Returns ``{"prompt_accuracy", "accuracy": {per attribute}, "fid", "n", "steps", "guidance",
    "seconds"}`` (and ``"images"`` if asked). FID is against real held-out images of the same prompts;
    image ``i`` starts from seed ``seed + i`` (`labkit.generate`), so configurations compare like for like.
    """
    held = shapes_data.heldout(n, seed=seed)
    start = time.perf_counter()
    # at the model's own size: a preset's large size (1024 px) is about speed, not what the classifier reads
    images = generate(
        pipe, held.prompts, steps=steps, size=native_size(pipe), guidance=guidance, seed=seed,
        chunk=batch_size, **kwargs,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    accuracy = attribute_accuracy(images, held.prompts)
    result = {
        "prompt_accuracy": accuracy["all"],
        "accuracy": accuracy,
        "fid": fid(held.images, images),
        "n": n,
        "steps": steps,
        "guidance": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "seconds": round(seconds, 2),
    }
    if return_images:
        result["images"] = images
        result["prompts"] = held.prompts
    return result


def reconstruct(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mode) and decode ``images`` (NHWC in [0, 1]) with ``vae``; NHWC in [0, 1]."""
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
            x = x.permute(0, 3, 1, 2).to(device, next(vae.parameters()).dtype) * 2 - 1  # the VAE's [-1, 1]
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            out.append((y.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def reconstruction_psnr(vae, n: int = 500, seed: int = 0) -> float:
    """Mean PSNR (dB) of ``vae``'s reconstructions of ``n`` held-out real shapes images."""
    images = shapes_data.heldout(n, seed=seed).images
    return psnr(images, reconstruct(vae, images))


def encoder_fingerprint(vae) -> str:
    """A short hash of a VAE's encoder weights (encoder and ``quant_conv``).

    Equal for VAEs that share a latent space, such as a VAE and its tuned-decoder variant.
    """
    import hashlib

    h = hashlib.sha256()
    for module in (vae.encoder, vae.quant_conv):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``p`` measured on ``n`` images.

    Unlike ``p +- z * sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not zero-width at 0 or 1.
    """
    if n <= 0:
        raise ValueError(f"n must be >= 1, not {n}")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
