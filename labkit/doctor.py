"""`doctor`: what this machine is, and which optimizations, presets and sources can run here, and why not."""

from __future__ import annotations

from pathlib import Path

import torch

from labkit.devices import default_device, environment
from labkit.models import shapes_variants, twin_names
from labkit.optimizations import OPTIMIZATIONS, PRESETS, preset_problems, step_problem


def sdpa_backends(device: str) -> dict[str, str]:
    """Which PyTorch SDPA kernels can run on ``device`` (on a CPU only the math kernel exists)."""
    if device != "cuda":
        return {"flash": "needs a CUDA GPU", "efficient": "needs a CUDA GPU", "math": "yes"}
    return {
        "flash": "yes" if torch.backends.cuda.is_flash_attention_available() else "not on this GPU or build",
        "efficient": "yes" if torch.backends.cuda.mem_efficient_sdp_enabled() else "disabled",
        "math": "yes",
    }


def doctor(sources: tuple[str, ...] = ("shapes", "twin:sd15")) -> dict:
    """A report of this machine: environment, SDPA kernels, and for each of ``sources`` which
    optimizations and presets run fully here (an optimization that needs trained weights runs only on
    a source that ships them)."""
    from labkit.shapes import MODEL_DIR

    device = default_device()
    report = {
        **environment(device),
        "sdpa_backends": sdpa_backends(device),
        "sources": {
            "shapes": "ok" if (Path(MODEL_DIR) / "model_index.json").exists() else "not trained yet",
            "shapes variants": [f"shapes:{n}" for n in shapes_variants()],
            "twins": [f"twin:{n}" for n in twin_names()],
        },
    }
    for source in sources:
        optimizations = {}
        for name in sorted(OPTIMIZATIONS, key=lambda n: (OPTIMIZATIONS[n].tier, OPTIMIZATIONS[n].stage)):
            problem = step_problem(name, source=source)
            optimizations[name] = problem or "ok"
        report[f"optimizations on {source}"] = optimizations
        report[f"presets on {source}"] = {
            name: preset_problems(name, source=source) or "ok" for name in PRESETS
        }
    return report
