"""labkit: the helper package of the lab on making Stable-Diffusion-style image generation fast and small.

The path every chapter follows::

    pipe = labkit.load_pipeline("twin:sd15")      # or "shapes", a folder, a hub id
    labkit.apply(pipe, "tier1")                  # a preset, or a list of optimizations
    result = labkit.benchmark(pipe)              # a result record: time, memory, FLOPs, environment
"""

__version__ = "0.1.0"

import logging

# Import-time notices about optional pieces the lab does not use (torchao's CUDA kernels on a CPU-only
# torch, torchvision-backed image processors) would fill every chapter's output: show errors only.
for _name in (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "transformers.utils.import_utils",
):
    logging.getLogger(_name).setLevel(logging.ERROR)

from labkit.measure import Result, append_results, benchmark, doctor, environment, load_results, results_table  # noqa: E402 (after the logging set-up)
from labkit.models import SourceError, generate, load_pipeline, twin_names  # noqa: E402 (after the logging set-up)
from labkit.tiers import OPTIMIZATIONS, PRESETS, Change, Unavailable, apply  # noqa: E402 (after the logging set-up)

__all__ = [
    "OPTIMIZATIONS",
    "PRESETS",
    "Change",
    "Result",
    "SourceError",
    "Unavailable",
    "append_results",
    "apply",
    "benchmark",
    "doctor",
    "environment",
    "generate",
    "load_pipeline",
    "load_results",
    "results_table",
    "twin_names",
]
