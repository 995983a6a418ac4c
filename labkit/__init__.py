"""labkit: the helper package of the lab on making Stable-Diffusion-style image generation fast and small.

The path every chapter follows::

    pipe = labkit.load_pipeline("twin:sd15")      # or "shapes", a folder, a hub id
    labkit.apply(pipe, "tier1")                  # a preset, or a list of optimizations
    result = labkit.benchmark(pipe)              # a result record: time, memory, FLOPs, environment
"""

__version__ = "0.1.0"

from labkit.measure import Result, append_results, benchmark, doctor, environment, load_results, results_table
from labkit.models import SourceError, generate, load_pipeline, twin_names
from labkit.tiers import OPTIMIZATIONS, PRESETS, Change, Unavailable, apply

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
