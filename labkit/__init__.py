"""labkit: the helper package of the lab on making Stable-Diffusion-style image generation fast and small.

The path every chapter follows::

    pipe = labkit.load_pipeline("twin:sd15")        # or "shapes", a folder, a hub id
    labkit.apply(pipe, "tier1")                    # a preset, or a list of optimizations
    result = labkit.benchmark(pipe)                # one record: time, memory, FLOPs, environment

and, for measurements kept in a records store and never taken twice::

    scenario = labkit.Scenario(source="twin:sd15", optimizations=("dpm_solver", "fp16"), label="fast")
    records = labkit.measure([scenario], store="records/")

ARCHITECTURE.md draws the layers and says where new code goes.
"""

import logging

from labkit._version import __version__

# Import-time notices about optional pieces the lab does not use (torchao's CUDA kernels on a CPU-only
# torch, torchvision-backed image processors) would fill every chapter's output: show errors only.
for _name in (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "transformers.utils.import_utils",
):
    logging.getLogger(_name).setLevel(logging.ERROR)

from labkit.devices import device_name, environment  # noqa: E402 (after the logging set-up)
from labkit.doctor import doctor  # noqa: E402
from labkit.measurement import Result, benchmark  # noqa: E402
from labkit.models import SourceError, generate, load_pipeline, twin_names  # noqa: E402
from labkit.optimizations import OPTIMIZATIONS, PRESETS, Change, Unavailable, apply  # noqa: E402
from labkit.records import Store, append_records, read_records  # noqa: E402
from labkit.scenarios import Scenario, measure  # noqa: E402

__all__ = [
    "OPTIMIZATIONS",
    "PRESETS",
    "Change",
    "Result",
    "Scenario",
    "SourceError",
    "Store",
    "Unavailable",
    "__version__",
    "append_records",
    "apply",
    "benchmark",
    "device_name",
    "doctor",
    "environment",
    "generate",
    "load_pipeline",
    "measure",
    "read_records",
    "twin_names",
]
