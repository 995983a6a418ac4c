"""Chapter 7, quantization: what torchao quantizes, int8 speed and weight bytes on a twin, quality on ``shapes``.

- `unet_coverage`: which share of a source's UNet weights torchao quantizes at all (linear layers), and so
  the most memory int8 can save (built on "meta" for a twin; nothing is measured);
- `speed_scenarios`: each scheme on fp32 and on the profile's half dtype, on the twin (kind
  ``quantized_generate``: a whole generation, plus the UNet's weight bytes as stored and its coverage);
- `QUALITY_ROWS` and `quality_scenarios`: fp32, the int8 schemes, int4 weights and the shipped QAT weights
  (quantized, and left in float: kind ``qat_weights_quality``) on ``shapes``, with the same-seed PSNR
  against fp32;
- `quantization_images`: a few prompts through each quality row, for the eye (not a measurement);
- `qat_info`: how the shipped QAT weights were trained;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from labkit.book import Profile, find, judge, match_margin
from labkit.devices import release_memory
from labkit.measurement import describe
from labkit.models import generate, load_pipeline, twin_config
from labkit.optimizations import Unavailable, apply
from labkit.optimizations.quantize import coverage, load_qat_weights, qat_command, qat_folder, weight_bytes
from labkit.optimizations.samplers import sampler_step
from labkit.quality import DEFAULT_GUIDANCE
from labkit.scenarios import MEASURERS, Scenario, measurer
from labkit.shapes import MODEL_DIR

SAMPLER = "DPM++ 2M"
"""The sampler of every measurement of the chapter, at the profile's fast step count."""

SPEED_SCHEMES = (None, "int8_weight_only", "int8_dynamic", "fp8_dynamic")
"""The schemes timed on the twin (``None``: unquantized)."""

_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}


# ---------------------------------------------------------------------------------------------------
# What torchao quantizes
# ---------------------------------------------------------------------------------------------------


def _meta_coverage(unet_config) -> dict:
    """`coverage` of a UNet built from its config on the "meta" device (shapes only, no memory)."""
    from diffusers import UNet2DConditionModel  # diffusers is a heavy import: only where it is used

    with torch.device("meta"):
        return coverage(UNet2DConditionModel.from_config(dict(unet_config)))


def unet_coverage(source: str) -> dict:
    """`coverage` of a source's UNet without loading a pipeline: ``shapes`` from its folder, a twin built
    on the meta device."""
    if source == "shapes":
        return _meta_coverage(json.loads((MODEL_DIR / "unet" / "config.json").read_text()))
    if source.startswith("twin:"):
        return _meta_coverage(twin_config(source.removeprefix("twin:"))["unet"])
    raise ValueError(f"unet_coverage takes 'shapes' or a twin such as 'twin:sd15', not {source!r}")


# ---------------------------------------------------------------------------------------------------
# Speed and weight bytes (twin)
# ---------------------------------------------------------------------------------------------------


@measurer("quantized_generate")
def _quantized_generate(scenario: Scenario, pipe, device) -> dict:
    """A whole generation (as ``generate``), plus ``unet_weight_bytes`` (quantized tensors counted by
    their storage) and the UNet's `coverage` (of its architecture: the same before and after)."""
    record = MEASURERS["generate"].fn(scenario, pipe, device)
    return record | {"unet_weight_bytes": weight_bytes(pipe.unet), **_meta_coverage(pipe.unet.config)}


def speed_scenarios(
    P: Profile, schemes: Sequence[str | None] = SPEED_SCHEMES, dtypes: Sequence[str] | None = None
) -> list[Scenario]:
    """Each scheme (``None``: unquantized) on each base dtype (default fp32 and the profile's half dtype),
    on the twin with DPM-Solver++ at the fast step count.

    The half dtype is applied as its precision optimization on the fp32 twin, then the UNet is quantized.
    A scheme that cannot run here (fp8 without an fp8 GPU) gives an ``unavailable`` record with the reason.
    """
    out = []
    for dtype in dtypes or ("float32", P.half_dtype):
        precision = () if dtype == "float32" else (_PRECISION[dtype],)
        for scheme in schemes:
            out.append(
                Scenario(
                    kind="quantized_generate",
                    source=P.twin,
                    optimizations=(sampler_step(SAMPLER, P.fast_steps), *precision, *filter(None, [scheme])),
                    size=P.size,
                    steps=P.fast_steps,
                    batch=min(P.batch_sizes),
                    repeats=P.repeats,
                    warmup=P.warmup,
                    label=f"{scheme or 'unquantized'}, {dtype}",
                    notes={"scheme": scheme or "none", "base_dtype": dtype},
                )
            )
    return out


# ---------------------------------------------------------------------------------------------------
# Quality (shapes)
# ---------------------------------------------------------------------------------------------------

QUALITY_ROWS: dict[str, tuple[str | None, bool]] = {
    "fp32": (None, False),
    "int8_weight_only": ("int8_weight_only", False),
    "int8_dynamic": ("int8_dynamic", False),
    "int8_dynamic + QAT": ("int8_dynamic", True),
    "int8_int4": ("int8_int4", False),
    "int8_int4 + QAT": ("int8_int4", True),
    "QAT weights, float": (None, True),
}
"""Quality rows of the chapter: label -> (scheme, whether the shipped QAT weights are loaded first)."""

QAT_FLOAT_SCHEME = "int8_dynamic"
"""Whose QAT weights the row "QAT weights, float" loads (and leaves in float)."""


def _row_steps(label: str, steps: int) -> list:
    """The optimizations of a quality row (the float QAT row loads its weights in its own kind)."""
    scheme, qat = QUALITY_ROWS[label]
    out: list = [sampler_step(SAMPLER, steps)]
    if scheme is not None:
        out.append(("int8_qat", {"scheme": scheme}) if qat else scheme)
    return out


@measurer("qat_weights_quality", pipeline=False, device_independent=True)
def _qat_weights_quality(scenario: Scenario, pipe, device) -> dict:
    """Quality (as ``quality``) of the source with its QAT-tuned linear weights loaded and left in float:
    what the fine-tuning alone changed. ``options``: ``scheme`` (whose QAT weights) and, as for
    ``quality``, ``reference``."""
    pipe = load_pipeline(scenario.source, device=device, dtype=scenario.dtype)
    pipe.set_progress_bar_config(disable=True)
    try:
        apply(pipe, scenario.steps_list())
        try:
            load_qat_weights(pipe, scheme=scenario.options["scheme"])
        except Unavailable as reason:
            return describe(pipe) | {"status": "unavailable", "reason": str(reason)}
        return MEASURERS["quality"].fn(scenario, pipe, device)
    finally:
        del pipe
        release_memory(device)


def quality_scenarios(P: Profile, rows: Sequence[str]) -> list[Scenario]:
    """Prompt accuracy and FID of each row (keys of `QUALITY_ROWS`) on ``P.model``, and the same-seed
    PSNR against the fp32 row's images, on the same ``P.quality_images`` held-out prompts and seeds.

    The fp32 row is the reference: it carries no PSNR. A row that cannot run here (no torchao, no QAT
    weights for its scheme) gives an ``unavailable`` record with the reason.
    """
    for label in rows:
        if label not in QUALITY_ROWS:
            raise ValueError(f"unknown quality row {label!r}; choose from {', '.join(QUALITY_ROWS)}")
    reference = Scenario(
        kind="quality",
        source=P.model,
        optimizations=tuple(_row_steps("fp32", P.fast_steps)),
        steps=P.fast_steps,
        n=P.quality_images,
    )
    out = []
    for label in rows:
        scheme, qat = QUALITY_ROWS[label]
        notes = {"scheme": scheme or "none", "base_dtype": "float32", "qat": qat, "sampler": SAMPLER}
        if label == "fp32":
            out.append(reference.but(label=label, notes=notes))
        elif scheme is None:  # QAT weights in float: no optimization does that, so a kind of its own
            options = {"scheme": QAT_FLOAT_SCHEME, "reference": reference.setup()}
            out.append(reference.but(kind="qat_weights_quality", options=options, label=label, notes=notes))
        else:
            out.append(
                reference.but(
                    optimizations=tuple(_row_steps(label, P.fast_steps)),
                    options={"reference": reference.setup()},
                    label=label,
                    notes=notes,
                )
            )
    return out


def quantization_images(
    P: Profile, rows: Sequence[str], prompts: Sequence[str], *, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """One image per prompt for each quality row that can run here, same seeds: (rows x prompts) images
    and the row labels. Image j starts from seed ``seed + j``, as image j of a quality measurement does.
    For the eye: nothing here is a measurement."""
    images, shown = [], []
    for label in rows:
        pipe = load_pipeline(P.model, device=P.device)
        pipe.set_progress_bar_config(disable=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a row that cannot run here is left out of the figure
                changes = apply(pipe, _row_steps(label, P.fast_steps))
            if QUALITY_ROWS[label] == (None, True):
                load_qat_weights(pipe, scheme=QAT_FLOAT_SCHEME)
            if any(c.status != "applied" for c in changes):
                continue
            images.append(
                generate(pipe, list(prompts), steps=P.fast_steps, guidance=DEFAULT_GUIDANCE, seed=seed)
            )
            shown.append(label)
        except Unavailable:
            continue
        finally:
            del pipe
            release_memory(P.device)
    return np.concatenate(images) if images else np.zeros((0, 1, 1, 3)), shown


# ---------------------------------------------------------------------------------------------------
# The shipped QAT weights
# ---------------------------------------------------------------------------------------------------

QAT_FOLDER = "labkit/shapes/variants/qat"
"""Where the QAT weights ship, as the training command names it (from the repository root)."""


def qat_info(scheme: str = "int8_dynamic") -> dict:
    """How the shipped QAT weights of ``scheme`` were trained (from the variant's ``config.json``):
    steps, minutes, device, loss, base fingerprint; ``{}`` when there are none."""
    path = qat_folder() / "config.json"
    if not path.exists():
        return {}
    entry = json.loads(path.read_text())["schemes"].get(scheme, {})
    keys = ("scheme", "target", "steps", "minutes", "device", "final_loss", "base_fingerprint")
    info = {k: entry.get(k) for k in keys if k in entry}
    config = entry.get("config", {})
    info |= {k: config[k] for k in ("batch_size", "lr") if k in config}
    return info


# ---------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------


def _text(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def verdict_rows(speed: Sequence[dict], scores: Sequence[dict], P: Profile) -> list[dict]:
    """The rows of the chapter's verdict, computed from its records with `labkit.book.judge`.

    ``speed``: records of `speed_scenarios` (unquantized and int8_dynamic on fp32 and the profile's half
    dtype); ``scores``: records of `quality_scenarios` (with the fp32 row). The memory claim is judged on
    the UNet's weight bytes against fp32 (the guide's 75% is int8's 1 byte for fp32's 4) and on the CUDA
    peak where there is one; the speed claim against the unquantized model in the same dtype; the quality
    claim ("moderate loss") and the QAT claim on prompt accuracy, with one standard error of the fp32
    accuracy as the noise floor.
    """
    half = P.half_dtype
    rows = []
    fp32 = find(speed, scheme="none", base_dtype="float32", status="ok")
    int8_32 = find(speed, scheme="int8_dynamic", base_dtype="float32", status="ok")
    base = find(speed, scheme="none", base_dtype=half, status="ok") or fp32
    int8 = find(speed, scheme="int8_dynamic", base_dtype=base["base_dtype"], status="ok")
    saved = 1 - int8_32["unet_weight_bytes"] / fp32["unet_weight_bytes"] if int8_32 else None
    bound = fp32["max_saving_int8"]
    rows.append(
        {
            "claim": "INT8: 75% memory (UNet weights, against fp32)",
            "claimed": "75% less",
            "measured": f"{_text(saved, '.0%')} less ({fp32['unet_weight_bytes'] / 2**20:.1f} -> "
            f"{_text(int8_32 and int8_32['unet_weight_bytes'] / 2**20, '.1f')} MiB); only "
            f"{fp32['linear_share']:.0%} of the weights are in linear layers, so at most "
            f"{bound:.0%}",
            "verdict": judge(saved, 0.75),
        }
    )
    if base.get("peak_allocated_gb") is None or int8 is None:
        peak_text, peak = f"not measurable on this device ({base['device']})", None
    else:
        peak = 1 - int8["peak_allocated_gb"] / base["peak_allocated_gb"]
        peak_text = (
            f"{peak:.0%} less ({base['peak_allocated_gb']:.2f} -> {int8['peak_allocated_gb']:.2f} GB, "
            f"int8 dynamic on {base['base_dtype']})"
        )
    rows.append(
        {
            "claim": "INT8: 75% memory (peak during generation)",
            "claimed": "75% less",
            "measured": peak_text,
            "verdict": judge(peak, 0.75),
        }
    )
    for ref, q in ((base, int8), (fp32, int8_32)) if base is not fp32 else ((fp32, int8_32),):
        speedup = ref["s_per_image"] / q["s_per_image"] if q else None
        rows.append(
            {
                "claim": f"INT8: 2-3x speed (int8 dynamic against {ref['base_dtype']})",
                "claimed": "2-3x",
                "measured": f"{_text(speedup)}x ({ref['s_per_image']:.3g} -> "
                f"{_text(q and q['s_per_image'])} s per image)",
                "verdict": judge(speedup, 2.0, 3.0),
            }
        )
    reference = find(scores, label="fp32")
    floor = match_margin(reference["prompt_accuracy"], reference["n"])
    ptq = find(scores, label="int8_dynamic", status="ok")
    qat = find(scores, label="int8_dynamic + QAT", status="ok")
    gap = ptq["prompt_accuracy"] - reference["prompt_accuracy"] if ptq else None
    rows.append(
        {
            "claim": "INT8: moderate quality loss (post-training, int8 dynamic)",
            "claimed": f"a loss beyond the noise (> {floor:.3f} prompt accuracy on {reference['n']} images)",
            "measured": f"{_text(gap, '+.3f')} prompt accuracy; FID {reference['fid']:.1f} -> "
            f"{_text(ptq and ptq['fid'], '.1f')}; same-seed PSNR "
            f"{_text(ptq and ptq['psnr_vs_reference'], '.1f')} dB",
            "verdict": "better than claimed: no measurable loss (within the noise)"
            if gap is not None and abs(gap) <= floor
            else judge(gap and -gap, floor, 1.0, tolerance=0),
        }
    )
    rows.append(_qat_row("int8_dynamic", ptq, qat, reference, floor, "INT8 requires QAT"))
    harsh_ptq = find(scores, label="int8_int4", status="ok")
    harsh_qat = find(scores, label="int8_int4 + QAT", status="ok")
    if harsh_ptq is not None:
        rows.append(_qat_row("int8_int4", harsh_ptq, harsh_qat, reference, floor, "int4 weights require QAT"))
    return rows


def _qat_row(scheme: str, ptq, qat, reference, floor: float, claim: str) -> dict:
    """Does QAT recover what post-training quantization lost? (a verdict row)."""
    if ptq is None:
        return {"claim": claim, "claimed": "", "measured": "not measured", "verdict": "not measured"}
    lost = reference["prompt_accuracy"] - ptq["prompt_accuracy"]
    if qat is None:
        recovered_text = f"no QAT weights for {scheme} ({qat_command(scheme, QAT_FOLDER)})"
        verdict = "not measured"
        if lost <= floor:
            verdict = "does not hold: PTQ loses nothing measurable, so QAT has nothing to recover"
    else:
        recovered = qat["prompt_accuracy"] - ptq["prompt_accuracy"]
        recovered_text = (
            f"QAT {qat['prompt_accuracy']:.3f} vs PTQ {ptq['prompt_accuracy']:.3f} "
            f"({recovered:+.3f}); FID {ptq['fid']:.1f} -> {qat['fid']:.1f}; same-seed PSNR "
            f"against fp32 {ptq['psnr_vs_reference']:.1f} -> {qat['psnr_vs_reference']:.1f} dB"
        )
        if lost <= floor:
            verdict = "does not hold: PTQ loses nothing measurable, QAT has nothing to recover"
        elif recovered > floor:
            verdict = "holds: QAT recovers accuracy PTQ lost"
        else:
            verdict = "does not hold: QAT does not recover what PTQ lost"
    return {
        "claim": f"{claim} ({scheme})",
        "claimed": "PTQ loses quality that QAT recovers",
        "measured": f"PTQ {ptq['prompt_accuracy'] - reference['prompt_accuracy']:+.3f} against fp32 "
        f"{reference['prompt_accuracy']:.3f}; {recovered_text}",
        "verdict": verdict,
    }
