"""The optimizations of the guide, one named function each, and the presets built from them.

Each family is one module: `samplers`, `swaps` (tuned VAE, distilled student), `precision`, `attention`,
`memory` (offloading, tiling, slicing), `compilation`, `quantize`. Every function takes a pipeline, changes
it with the current diffusers API and returns a `Change` that says what it changed; where its needs are
missing (a CUDA GPU, xFormers, torchao, trained weights) it raises `Unavailable` with the reason.

`apply` is the way in: a preset or a list of steps, checked before anything changes (unknown names get
the list and the closest match), run in a fixed stage order (samplers, swaps, precision, attention,
layout, quantization, offload, compile); an unavailable step is reported, never skipped silently.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from labkit.optimizations import attention, compilation, memory, precision, quantize, samplers, swaps
from labkit.optimizations.registry import OPTIMIZATIONS, Change, Optimization, Unavailable, missing, set_call
from labkit.optimizations.samplers import SAMPLERS, use_sampler

__all__ = [
    "OPTIMIZATIONS",
    "PRESETS",
    "SAMPLERS",
    "Change",
    "Optimization",
    "Preset",
    "Unavailable",
    "apply",
    "check_steps",
    "missing",
    "parse_step",
    "preset_problems",
    "use_sampler",
]

FAMILIES = (samplers, swaps, precision, attention, memory, compilation, quantize)
"""The modules that register optimizations, in the order a reader meets them."""

# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named list of optimizations plus the call settings (steps, guidance, batch, size) it implies."""

    name: str
    description: str
    steps: list[tuple[str, dict]]
    call: dict = field(default_factory=dict)


def _p(name: str, **options) -> tuple[str, dict]:
    return (name, options)


_TIER1 = [_p("dpm_solver", steps=20), _p("fp16"), _p("sdpa"), _p("swap_vae")]
_TIER2 = [
    _p("model_cpu_offload"),
    _p("vae_tiling"),
    _p("attention_slicing"),
    _p("xformers"),
    _p("torch_compile", mode="reduce-overhead"),
]
_TIER3 = [_p("int8_dynamic"), _p("distilled_student")]

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "baseline",
            "The reference: fp32, classic attention, PNDM at 50 steps, guidance 7.5 (Stable Diffusion 1.x as "
            "released, before PyTorch SDPA).",
            [_p("pndm", steps=50), _p("classic_attention")],
            {"guidance": 7.5},
        ),
        Preset(
            "tier1",
            "The guide's tier 1: DPM-Solver++ at 20 steps, fp16, the tuned VAE where the source has one; "
            "attention is PyTorch SDPA (diffusers' default).",
            _TIER1,
            {"guidance": 7.5},
        ),
        Preset(
            "tier1+2",
            "Tier 1 plus the guide's tier 2 as written: model CPU offload, VAE tiling, attention slicing, "
            "xFormers, torch.compile (reduce-overhead).",
            _TIER1 + _TIER2,
            {"guidance": 7.5},
        ),
        Preset(
            "tier1+2+3",
            "Tiers 1 and 2 plus tier 3: int8 dynamic quantization of the UNet and a distilled student UNet. "
            "Custom schedulers are left out: they need a model trained for them (custom schedulers chapter).",
            _TIER1 + _TIER2 + _TIER3,
            {"guidance": 7.5},
        ),
        Preset(
            "latency",
            "Real-time generation: DPM-Solver++ at 20 steps, fp16, xFormers (else SDPA), torch.compile with "
            "CUDA graphs (reduce-overhead). The guide expects < 1 s per 512 px image.",
            [
                _p("dpm_solver", steps=20),
                _p("fp16"),
                _p("sdpa"),
                _p("xformers"),
                _p("torch_compile", mode="reduce-overhead"),
            ],
            {"guidance": 7.5, "batch": 1},
        ),
        Preset(
            "quality",
            "High quality: DDIM at 100 steps, fp16, guidance 12, the tuned VAE. The guide's cosine beta "
            "schedule is left out: it needs a model trained for it. The guide expects about 5 s per image.",
            [_p("ddim", steps=100), _p("fp16"), _p("sdpa"), _p("swap_vae")],
            {"guidance": 12.0},
        ),
        Preset(
            "memory",
            "Memory constrained (4-6 GB): fp16, model CPU offload, VAE tiling, attention slicing, the model's "
            "own sampler at 50 steps.",
            [_p("fp16"), _p("model_cpu_offload"), _p("vae_tiling"), _p("attention_slicing")],
            {"guidance": 7.5, "steps": 50},
        ),
        Preset(
            "throughput",
            "Batch processing: batch 16, fp16, xFormers (else SDPA), torch.compile, the model's own sampler "
            "at 50 steps. The guide expects maximum images per second.",
            [_p("fp16"), _p("sdpa"), _p("xformers"), _p("torch_compile", mode="default")],
            {"guidance": 7.5, "steps": 50, "batch": 16},
        ),
        Preset(
            "complete",
            "The guide's complete optimization stack, line by line: fp16, DPM-Solver++ at 20 steps, the tuned "
            "VAE, model CPU offload, VAE tiling, xFormers, torch.compile (reduce-overhead), 1024x1024.",
            [
                _p("dpm_solver", steps=20),
                _p("fp16"),
                _p("swap_vae"),
                _p("model_cpu_offload"),
                _p("vae_tiling"),
                _p("xformers"),
                _p("torch_compile", mode="reduce-overhead"),
            ],
            {"guidance": 7.5, "size": 1024},
        ),
    ]
}
"""The presets, by name: the guide's tiers, its four use cases and its complete stack."""

# ---------------------------------------------------------------------------------------------------
# Checking steps before anything runs
# ---------------------------------------------------------------------------------------------------

CHOICES: dict[tuple[str, str], tuple] = {
    ("torch_compile", "mode"): compilation.COMPILE_MODES,
    ("sdpa", "backend"): (*attention.SDPA_BACKENDS, None),
    ("group_offload", "offload_type"): memory.OFFLOAD_TYPES,
    ("custom_scheduler", "beta_schedule"): samplers.BETA_SCHEDULES,
    ("custom_scheduler", "prediction_type"): samplers.PREDICTION_TYPES,
    ("int8_qat", "scheme"): quantize.QAT_SCHEMES,
}
"""The values an option may take, where it is one of a few names."""

# options that take a module or a folder, not a value that can be written on a command line
_OBJECT_OPTIONS = {("swap_vae", "vae"), ("distilled_student", "unet")}


def closest(name: str, names) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``names``, or ``""``."""
    match = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _types(annotation: str) -> set[str]:
    return {part.strip() for part in str(annotation).split("|")}


def _check_option(name: str, key: str, value: Any, parameter) -> None:
    where = f"option {key}={value!r} of {name}"
    if (name, key) in _OBJECT_OPTIONS:
        return
    if (name, key) in CHOICES:
        allowed = CHOICES[(name, key)]
        if value not in allowed:
            shown = ", ".join(repr(v) for v in allowed)
            raise ValueError(f"{where}: choose one of {shown}{closest(value, [a for a in allowed if a])}")
        return
    types = _types(parameter.annotation)
    if value is None:
        if "None" not in types:
            raise ValueError(f"{where}: a value is needed")
        return
    if "bool" in types and isinstance(value, bool):
        return
    if "int" in types and isinstance(value, int) and not isinstance(value, bool):
        if key == "steps" and value < 1:
            raise ValueError(f"{where}: steps must be >= 1")
        if value < 1 and key == "slice_size":
            raise ValueError(f"{where}: slice_size must be >= 1 or 'auto'")
        return
    if "float" in types and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{where}: a finite number is needed")
        return
    if "str" in types and isinstance(value, str) and value:
        return
    expected = " or ".join(sorted(t for t in types if t != "None"))
    raise ValueError(f"{where}: expected {expected}")


def check_steps(spec: str | list) -> list[tuple[str, dict]]:
    """A preset name or a list of steps (names, ``"name:key=value"`` or ``(name, options)``) as checked
    ``(name, options)`` pairs. Raises ``ValueError`` naming what is wrong and what is valid, before any
    pipeline is touched."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(
                f"unknown preset {spec!r}; choose one of: {', '.join(PRESETS)}{closest(spec, PRESETS)}"
            )
        return [(n, dict(o)) for n, o in PRESETS[spec].steps]
    steps = []
    for step in spec:
        if isinstance(step, str):
            name, options = parse_step(step)
        else:
            name, options = step[0], dict(step[1]) if len(step) > 1 else {}
        if name not in OPTIMIZATIONS:
            raise ValueError(
                f"unknown optimization {name!r}{closest(name, OPTIMIZATIONS)}; choose one of: "
                + ", ".join(OPTIMIZATIONS)
            )
        allowed = OPTIMIZATIONS[name].options
        for key, value in options.items():
            if key not in allowed:
                valid = ", ".join(allowed) or "none"
                raise ValueError(f"{name} has no option {key!r}{closest(key, allowed)}; its options: {valid}")
            _check_option(name, key, value, allowed[key])
        steps.append((name, options))
    return steps


def parse_step(text: str) -> tuple[str, dict]:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` (the command line's ``--apply``) into (name, options).

    Values are read as int, float, true/false/none, else kept as text; an option without a value is an
    error (``ValueError``).
    """
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not value.strip():
            raise ValueError(f"option {key!r} of {name} has no value: write {name}:{key}=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return name.strip(), options


def _parse_value(value: str) -> Any:
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


# ---------------------------------------------------------------------------------------------------
# apply()
# ---------------------------------------------------------------------------------------------------


def apply(pipe, spec: str | list) -> list[Change]:
    """Apply a preset (by name) or a list of optimizations (names, ``"name:key=value"`` or ``(name, options)``).

    Everything is checked first (`check_steps`): a bad name or option raises ``ValueError`` and leaves
    ``pipe`` untouched. Steps then run in stage order; a step that cannot run here is skipped and
    reported as an ``"unavailable"`` `Change` with the reason (and a warning), never silently.
    """
    steps = check_steps(spec)
    if isinstance(spec, str):
        pipe.labkit_preset = spec
    changes = []
    for name, options in sorted(steps, key=lambda step: OPTIMIZATIONS[step[0]].stage):
        try:
            changes.append(OPTIMIZATIONS[name].fn(pipe, **options))
        except Unavailable as reason:
            warnings.warn(str(reason), stacklevel=2)
            change = Change(name, "unavailable", str(reason).removeprefix(f"{name}: "), options)
            pipe.labkit_applied = [*getattr(pipe, "labkit_applied", []), change]
            changes.append(change)
    if isinstance(spec, str) and PRESETS[spec].call:
        set_call(pipe, **PRESETS[spec].call)
    return changes


def preset_problems(name: str, pipe=None, source: str | None = None) -> list[str]:
    """The steps of preset ``name`` that cannot run here, each with the reason (for `labkit doctor`).

    ``source`` (``"twin:sd15"``, ``"shapes"``) also checks the steps that need trained weights.
    """
    problems = []
    for step, _ in PRESETS[name].steps:
        if (problem := step_problem(step, pipe, source)) is not None:
            problems.append(f"{step}: {problem}")
    return problems


def step_problem(name: str, pipe=None, source: str | None = None, options: dict | None = None) -> str | None:
    """Why optimization ``name`` cannot run here (on ``source``, when given), or None; loads nothing.

    A step given its own trained weights (``swap_vae`` with ``vae=``, ``distilled_student`` with
    ``unet=``) does not need the source to ship them.
    """
    options = options or {}
    for need in OPTIMIZATIONS[name].needs:
        if (problem := missing(need, pipe)) is not None:
            return problem
    if source is not None and not (options.get("vae") is not None or options.get("unet") is not None):
        try:
            if name == "swap_vae":
                swaps.variant_dir(source, "vae")
            elif name == "distilled_student" and source not in swaps.STUDENT_TWINS:
                swaps.variant_dir(source, "student")
            elif name == "int8_qat" and source != "shapes":
                return f"{source} ships no QAT weights (a twin's weights are random)"
        except Unavailable as reason:
            return str(reason)
    return None
