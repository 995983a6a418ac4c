"""``shapes``: labkit's embedded text-to-image model and the procedural data it was trained on.

A real (tiny) Stable Diffusion pipeline that draws "a small red circle at the top left", shipped inside the
package so that every chapter runs offline and its quality numbers mean something (see
:mod:`labkit.quality`). ``labkit.load_pipeline("shapes")`` loads ``MODEL_DIR``; ``labkit train shapes`` trains it.
"""

from pathlib import Path

from .data import ATTRIBUTES, IMAGE_SIZE, all_prompts, heldout, make_prompt, parse_prompt, sample

#: the shipped pipeline (``StableDiffusionPipeline.from_pretrained(MODEL_DIR)``)
MODEL_DIR = Path(__file__).parent / "model"
#: the shipped shapes classifier (weights) and its config, used by :mod:`labkit.quality`
CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
CLASSIFIER_CONFIG_PATH = Path(__file__).parent / "classifier.json"
#: trained variants: ``vae`` (a tuned decoder), and UNets that load as ``load_pipeline("shapes:NAME")``
VARIANTS_DIR = Path(__file__).parent / "variants"

__all__ = [
    "ATTRIBUTES",
    "CLASSIFIER_CONFIG_PATH",
    "CLASSIFIER_PATH",
    "IMAGE_SIZE",
    "MODEL_DIR",
    "VARIANTS_DIR",
    "all_prompts",
    "heldout",
    "make_prompt",
    "parse_prompt",
    "sample",
]
