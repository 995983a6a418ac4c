"""Chapter 3, numerics: fp32, TF32, fp16 and bf16, for speed and memory on a twin and for the pictures of
``shapes``.

- `PRECISIONS`: the four formats, as optimizations;
- `speed_scenarios`: each format at each batch size of the profile on the twin (``generate``; TF32 runs
  as the ``tf32`` kind, which keeps its process-wide switch to its own scenarios);
- `breakdown_scenarios`: where the time of a generation goes, fp32 and the half precision at the
  smallest and largest batch (``generate`` with ``breakdown``);
- `quality_scenarios`: prompt accuracy, FID and same-seed PSNR against fp32 of each format on ``shapes``
  (``quality`` with a ``reference``);
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from labkit.book import Profile, find, judge, match_margin
from labkit.devices import release_memory
from labkit.models import load_pipeline
from labkit.optimizations import apply
from labkit.optimizations.samplers import sampler_step
from labkit.scenarios import MEASURERS, Scenario, measurer

PRECISIONS: dict[str, list[str]] = {"fp32": [], "tf32": ["tf32"], "fp16": ["fp16"], "bf16": ["bf16"]}
"""The numeric formats of the chapter: name -> the optimizations that give it."""

SAMPLER = "DPM++ 2M"
"""Every format generates with DPM-Solver++ at the profile's fast step count."""

HALF = {"float16": "fp16", "bfloat16": "bf16"}
"""A profile's half dtype -> the name of its format."""


# ---------------------------------------------------------------------------------------------------
# TF32: a process-wide switch, kept to its own scenarios
# ---------------------------------------------------------------------------------------------------


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_flags(flags: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


_PROCESS_TF32 = _tf32_flags()
"""The TF32 switches as the process had them when this module was imported (PyTorch's defaults unless
changed before): every other format runs under them, and a ``tf32`` scenario puts them back."""


@measurer("tf32", device_independent=lambda s: MEASURERS[s.options["of"]].device_independent(s))
def _tf32(scenario: Scenario, pipe, device) -> dict:
    """A ``generate`` or ``quality`` scenario (``options["of"]``) with TF32 matmuls and convolutions, the
    process-wide switches put back after it, so that the next scenario runs in true fp32.

    The ``tf32`` optimization turned them on when the pipeline was built, and an earlier scenario of the
    same build may have put them back: they are turned on here, for the measurement only. Utilisation is against the TF32 matmul
    peak (`labkit.measurement.matmul_peak_tflops` reads the switch). A quality scenario's ``reference``
    is generated first, with the switches as the process had them: its PSNR is against true fp32.
    """
    inner = MEASURERS[scenario.options["of"]]
    _set_tf32_flags(_PROCESS_TF32)
    try:
        if scenario.options["of"] == "quality" and "reference" in scenario.options:
            _generate_reference(Scenario(**scenario.options["reference"]), device)
        _set_tf32_flags((True, True))
        return inner.fn(scenario, pipe, device)
    finally:
        _set_tf32_flags(_PROCESS_TF32)


def _generate_reference(reference: Scenario, device) -> None:
    """Measure the ``reference`` quality scenario (its record is not kept): the quality kind keeps the images
    of this process's quality scenarios, so the next scenario's PSNR against it uses these."""
    base = load_pipeline(reference.source, device=device, dtype=reference.dtype)
    base.set_progress_bar_config(disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a step that cannot run here fails the scenario that needs it
            apply(base, reference.steps_list())
        MEASURERS["quality"].fn(reference, base, device)
    finally:
        del base
        release_memory(device)


def _flags(P: Profile, precision: str) -> dict:
    """The TF32 switches a format runs under (on a CUDA device; they mean nothing elsewhere)."""
    if not P.device.startswith("cuda"):
        return {"tf32_matmul": None, "tf32_cudnn": None}
    matmul, cudnn = (True, True) if precision == "tf32" else _PROCESS_TF32
    return {"tf32_matmul": matmul, "tf32_cudnn": cudnn}


def _scenario(P: Profile, precision: str, of: str, *, options: dict | None = None, **fields) -> Scenario:
    """A scenario of ``precision`` with DPM-Solver++ at the fast step count: of kind ``of``, or of the
    ``tf32`` kind wrapping it."""
    tf32 = precision == "tf32"
    return Scenario(
        kind="tf32" if tf32 else of,
        optimizations=(sampler_step(SAMPLER, P.fast_steps), *PRECISIONS[precision]),
        steps=P.fast_steps,
        options=({"of": of} if tf32 else {}) | (options or {}),
        **fields,
    )


# ---------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------


def speed_scenarios(P: Profile, precisions: Sequence[str] = tuple(PRECISIONS)) -> list[Scenario]:
    """Each format at each batch size of the profile on its twin (one warm-up, timed repeats).

    FLOPs and utilisation of the matmul peak are counted on a CUDA device only: on a CPU, measuring the
    half-precision matmul peak alone takes many seconds and means little. Records get ``precision``,
    ``sampler`` and the TF32 switches in force (``tf32_matmul``, ``tf32_cudnn``: PyTorch's default lets
    cuDNN convolutions use TF32 even in "fp32").
    """
    return [
        _scenario(
            P,
            precision,
            "generate",
            source=P.twin,
            size=P.size,
            batch=batch,
            repeats=P.repeats,
            warmup=P.warmup,
            flops=P.device.startswith("cuda"),
            label=f"{precision}, batch {batch}",
            notes={"precision": precision, "sampler": SAMPLER, **_flags(P, precision)},
        )
        for precision in precisions
        for batch in P.batch_sizes
    ]


def breakdown_edges(P: Profile) -> list[int]:
    """The batch sizes of the breakdown: the profile's smallest and largest."""
    return sorted({min(P.batch_sizes), max(P.batch_sizes)})


def breakdown_scenarios(P: Profile) -> list[Scenario]:
    """Where the time goes (`labkit.profiling.time_breakdown`) in fp32 and in the profile's half precision,
    at the smallest and largest batch: seconds per region and, on a GPU, the busy share."""
    return [
        _scenario(
            P,
            precision,
            "generate",
            source=P.twin,
            size=P.size,
            batch=batch,
            repeats=1,
            warmup=1,
            breakdown=True,
            label=f"{precision}, batch {batch}",
            notes={"precision": precision, "sampler": SAMPLER},
        )
        for precision in ("fp32", HALF[P.half_dtype])
        for batch in breakdown_edges(P)
    ]


def quality_scenarios(P: Profile, precisions: Sequence[str] = tuple(PRECISIONS)) -> list[Scenario]:
    """Prompt accuracy, FID and same-seed PSNR against fp32 (``psnr_vs_reference``) of each format on
    ``P.quality_images`` held-out prompts of ``shapes``: every format draws the same prompts from the
    same seeds, so the PSNR says how much the picture itself changes."""

    def scenario(precision: str, options: dict) -> Scenario:
        return _scenario(
            P,
            precision,
            "quality",
            source=P.model,
            n=P.quality_images,
            options=options,
            label=precision,
            notes={"precision": precision, "sampler": SAMPLER},
        )

    reference = {"reference": scenario("fp32", {}).setup()}
    return [scenario(precision, reference) for precision in precisions]


# ---------------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------------


def _f(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def verdict_rows(speed: Sequence[dict], scores: Sequence[dict], P: Profile) -> list[dict]:
    """The rows of the chapter's verdict, computed from its records with `labkit.book.judge`.

    ``speed``: `speed_scenarios` records (fp32, fp16 and bf16 at the profile's batch sizes);
    ``scores``: `quality_scenarios` records (fp32 among them).
    """
    batches = (min(P.batch_sizes), max(P.batch_sizes))
    fp32 = {b: find(speed, precision="fp32", batch=b, status="ok") for b in batches}
    reference = find(scores, precision="fp32")
    margin = match_margin(reference["prompt_accuracy"], reference["n"])
    rows = []
    for name in ("fp16", "bf16"):
        half = {b: find(speed, precision=name, batch=b, status="ok") for b in batches}
        speedup = {b: _ratio(fp32[b]["s_per_image"], half[b]["s_per_image"]) for b in batches}
        memory = {
            b: _ratio(half[b].get("peak_allocated_gb"), fp32[b].get("peak_allocated_gb")) for b in batches
        }
        q = find(scores, precision=name)
        gap = q["prompt_accuracy"] - reference["prompt_accuracy"]
        claim = "FP16" if name == "fp16" else "bf16 instead of FP16 (not in the guide)"
        if memory[batches[0]] is None:
            memory_text = f"not measurable on this device ({fp32[batches[0]]['device']})"
        else:
            memory_text = ", ".join(f"{memory[b]:.0%} of fp32 at batch {b}" for b in batches)
        rows += [
            {
                "claim": f"{claim}: 50% memory",
                "claimed": "50% of fp32's peak memory",
                "measured": memory_text,
                "verdict": judge(memory[batches[0]], 0.5),
            },
            *(
                {
                    "claim": f"{claim}: 1.5-2x speed (batch {b})",
                    "claimed": "1.5-2x",
                    "measured": f"{_f(speedup[b])}x ({_f(fp32[b]['s_per_image'])} s -> "
                    f"{_f(half[b]['s_per_image'])} s per image)",
                    "verdict": judge(speedup[b], 1.5, 2.0),
                }
                for b in dict.fromkeys(batches)
            ),
            {
                "claim": f"{claim}: negligible quality loss",
                "claimed": f"prompt accuracy within the noise (±{margin:.3f} on {q['n']} images)",
                "measured": f"{gap:+.3f} prompt accuracy; FID {reference['fid']:.1f} -> {q['fid']:.1f}; "
                f"same-seed PSNR {q['psnr_vs_reference']:.1f} dB; {q['nan_images']} NaN images",
                "verdict": "does not hold (NaN images)"
                if q["nan_images"]
                else judge(gap, -margin, margin, tolerance=0),
            },
        ]
    return rows
