"""Chapter 9, distillation: BK-SDM's cut of a UNet at real scale, and a distilled ``shapes`` student.

Two questions, two sources:

- **speed at real scale**: BK-SDM's architectural cut (Kim et al., 2023; `labkit.optimizations.swaps.bk_cuts`)
  applied to a twin's UNet (random weights: speed, memory and FLOPs only). `twin_cuts` gives the teacher's
  UNet config and its two cuts (for ``twin:sd15`` exactly ``twin:bk-sdm-base`` and ``twin:bk-sdm-small``);
  `cost_scenarios` counts their parameters and FLOPs per UNet evaluation (on "meta": SD 1.5 at 512 px costs
  nothing to count) and times one evaluation (``unet_cost``); `speed_scenarios` times whole images (kind
  ``cut_generate``: the twin with its UNet replaced by a cut); `cuts_table` puts them side by side.
- **quality**: only a trained student can say what a cut costs in pictures. `quality_scenarios` scores the
  ``shapes`` teacher and its shipped distilled student (``distilled_student``) on the same held-out prompts
  and seeds; `student_speed_scenarios` times both; `scores_table` shows them; `student_images` draws a few
  prompts through both, for the eye; `student_info` says how the student was trained.

`verdict_rows` turns both into the verdict rows for the guide's "2-4x faster, smaller model, slight quality
loss".
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from labkit.book import Profile, judge, match_margin
from labkit.devices import release_memory
from labkit.measurement import describe
from labkit.models import generate, load_pipeline, quiet_diffusers, twin_config
from labkit.optimizations import apply
from labkit.optimizations.samplers import sampler_step
from labkit.optimizations.swaps import CUTS as SWAP_CUTS
from labkit.optimizations.swaps import bk_cuts
from labkit.quality import DEFAULT_GUIDANCE
from labkit.scenarios import MEASURERS, Scenario, measurer
from labkit.shapes import VARIANTS_DIR, heldout

CUTS = ("teacher", "BK-SDM-Base cut", "BK-SDM-Small cut")
"""The labels of `twin_cuts`: the twin's own UNet, then BK-SDM-Base's and BK-SDM-Small's cuts."""

REAL_SCALE = "twin:sd15"
"""The twin whose cuts are BK-SDM's own (``twin:bk-sdm-base``, ``twin:bk-sdm-small``)."""

UNET_BATCH = 2
"""The batch of a UNet evaluation in `cost_scenarios`: one sampling step with classifier-free guidance."""

SAMPLER = "DPM++ 2M"
"""The sampler of every generation of the chapter, at the profile's fast step count."""

STUDENT_COMMANDS = {
    "cpu": "labkit train student --preset cpu --threads 1 --minutes 62 --eval-n 0 "
    "--out runs/student --export labkit/shapes/variants/student",
    "gpu": "labkit train student --preset gpu --device cuda --out runs/student-gpu "
    "--export labkit/shapes/variants/student",
}
"""The commands that train the shipped ``shapes`` student again, on a CPU and on a GPU."""


# ---------------------------------------------------------------------------------------------------
# The cut, at real scale (twins)
# ---------------------------------------------------------------------------------------------------


def twin_size(twin: str) -> int:
    """The native image side of a twin in pixels (512 for SD 1.5)."""
    return int(twin_config(twin.removeprefix("twin:"))["image_size"])


def twin_cuts(twin: str) -> dict[str, dict]:
    """`bk_cuts` of a twin's UNet (``"twin:sd15"`` or ``"sd15"``), labelled as `CUTS`."""
    cuts = bk_cuts(twin_config(twin.removeprefix("twin:"))["unet"])
    return {label: cuts[name] for label, name in zip(CUTS, SWAP_CUTS, strict=True)}


def _cut_notes(config: dict, batch: int) -> dict:
    # the batch too: FLOPs depend on it, and the unet_cost kind keeps it in the scenario only
    return {
        "batch": batch,
        "layers_per_block": config.get("layers_per_block", 2),
        "mid_block": config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None,
    }


def cost_scenarios(P: Profile) -> list[Scenario]:
    """Parameters, FLOPs and time of one UNet evaluation (batch 2: one sampling step with guidance) for the
    teacher and each cut of the profile's twin; where that twin is not SD 1.5, SD 1.5's are counted too
    (on "meta", not timed: no memory, a few seconds on a CPU)."""
    twins = {P.twin: (P.size, P.repeats, P.warmup)}
    if P.twin != REAL_SCALE:
        twins[REAL_SCALE] = (twin_size(REAL_SCALE), 0, 0)
    out = []
    for twin, (size, repeats, warmup) in twins.items():
        factor = 2 ** (len(twin_config(twin.removeprefix("twin:"))["vae"]["block_out_channels"]) - 1)
        for label, config in twin_cuts(twin).items():
            out.append(
                Scenario(
                    kind="unet_cost",
                    source=twin,
                    dtype=P.half_dtype,
                    size=size,
                    batch=UNET_BATCH,
                    repeats=repeats,
                    warmup=warmup,
                    options={"unet": config, "side": size // factor},
                    label=label,
                    notes=_cut_notes(config, UNET_BATCH),
                )
            )
    return out


@measurer("cut_generate", pipeline=False)
def _cut_generate(scenario: Scenario, pipe, device) -> dict:
    """A whole generation (as ``generate``) of the source with its UNet replaced by
    ``UNet2DConditionModel(**options["unet"])`` with random weights drawn from ``seed`` (through
    ``distilled_student``): a BK-SDM cut of a twin, then the scenario's optimizations."""
    from diffusers import UNet2DConditionModel  # diffusers is a heavy import: only where it is used

    pipe = load_pipeline(scenario.source, device=device, dtype=scenario.dtype, seed=scenario.seed)
    pipe.set_progress_bar_config(disable=True)
    try:
        torch.manual_seed(scenario.seed)
        with torch.device(pipe.unet.device), quiet_diffusers():
            unet = UNet2DConditionModel(**scenario.options["unet"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unavailable step is reported in the record instead
            # the swap first, on its own: apply() would run the sampler before it
            changes = apply(pipe, [("distilled_student", {"unet": unet})])
            changes += apply(pipe, scenario.steps_list())
        missing = [c for c in changes if c.status != "applied"]
        if missing:
            reason = "; ".join(f"{c.name}: {c.what}" for c in missing)
            return describe(pipe) | {"status": "unavailable", "reason": reason}
        return MEASURERS["generate"].fn(scenario, pipe, device)
    finally:
        del pipe
        release_memory(device)


def speed_scenarios(P: Profile) -> list[Scenario]:
    """Seconds per image and peak memory of the teacher and each cut of the profile's twin, end to end, in
    the profile's half precision with DPM-Solver++ at the fast step count (the pipeline's own guidance)."""
    teacher = Scenario(
        kind="generate",
        source=P.twin,
        dtype=P.half_dtype,
        optimizations=(sampler_step(SAMPLER, P.fast_steps),),
        size=P.size,
        steps=P.fast_steps,
        repeats=P.repeats,
        warmup=P.warmup,
        label=CUTS[0],
    )
    cuts = twin_cuts(P.twin)
    return [teacher] + [
        teacher.but(kind="cut_generate", options={"unet": cuts[label]}, label=label) for label in CUTS[1:]
    ]


def cuts_table(costs: Sequence[dict], speed: Sequence[dict] = ()):
    """One row per UNet: parameters, FLOPs and time per evaluation, time per image, peak memory, each also
    as a ratio to the teacher of the same twin."""
    import pandas as pd

    rows = []
    for r in costs:
        base = next(b for b in costs if b["label"] == "teacher" and b["source"] == r["source"])
        whole = next((s for s in speed if s["label"] == r["label"] and s["source"] == r["source"]), {})
        timed = whole.get("status") == "ok"
        s_eval, base_eval = r.get("seconds"), base.get("seconds")
        rows.append(
            {
                "twin": r["source"],
                "UNet": r["label"],
                "layers per stage": str(r["layers_per_block"]),
                "mid block": r["mid_block"],
                "parameters (M)": r["parameters"] / 1e6,
                "x fewer parameters": base["parameters"] / r["parameters"],
                "GFLOP / evaluation": r["flops"] / 1e9,
                "x fewer FLOPs": base["flops"] / r["flops"],
                "s / evaluation": s_eval,
                "x faster (UNet)": base_eval / s_eval if s_eval and base_eval else None,
                "s / image": whole.get("s_per_image") if timed else None,
                "peak GB": whole.get("peak_allocated_gb") if timed else None,
            }
        )
    table = pd.DataFrame(rows)
    return table.dropna(axis="columns", how="all").round(3)


# ---------------------------------------------------------------------------------------------------
# Quality: the shapes student
# ---------------------------------------------------------------------------------------------------


def _teacher_quality(P: Profile) -> Scenario:
    return Scenario(
        kind="quality",
        source=P.model,
        dtype=P.dtype,
        optimizations=(sampler_step(SAMPLER, P.fast_steps),),
        steps=P.fast_steps,
        n=P.quality_images,
        label="teacher",
        notes={"sampler": SAMPLER},
    )


def quality_scenarios(P: Profile) -> list[Scenario]:
    """The ``shapes`` teacher and its distilled student (the shipped one) on the same ``P.quality_images``
    held-out prompts and seeds: prompt accuracy (and per attribute), FID, and for the student the same-seed
    PSNR against the teacher's images (``psnr_vs_reference``)."""
    teacher = _teacher_quality(P)
    student = teacher.but(
        optimizations=(*teacher.optimizations, ("distilled_student", {})),
        options={"reference": teacher.setup()},
        label="student",
    )
    return [teacher, student]


def student_speed_scenarios(P: Profile) -> list[Scenario]:
    """Seconds per image of the ``shapes`` teacher and its student (one image, with guidance), labelled
    ``teacher`` and ``student`` like their quality rows."""
    return [
        Scenario(
            kind="generate",
            source=s.source,
            dtype=s.dtype,
            optimizations=s.optimizations,
            steps=s.steps,
            repeats=P.repeats,
            warmup=P.warmup,
            label=s.label,
            notes=s.notes,
        )
        for s in quality_scenarios(P)
    ]


def scores_table(scores: Sequence[dict], speed: Sequence[dict] = ()):
    """The records of `quality_scenarios` as a table, with the seconds per image of `student_speed_scenarios`
    (matched by label)."""
    import pandas as pd

    rows = []
    for r in scores:
        if r.get("status") != "ok":
            note = r.get("reason") or r.get("error", "")
            rows.append({"UNet": r["label"], "status": r.get("status"), "note": note})
            continue
        timed = next((s for s in speed if s["label"] == r["label"] and s.get("status") == "ok"), {})
        rows.append(
            {
                "UNet": r["label"],
                "status": r["status"],
                "parameters (M)": r["unet_parameters"] / 1e6,
                "n": r["n"],
                "steps": r["steps"],
                "prompt accuracy": r["prompt_accuracy"],
                **{k: v for k, v in r["accuracy"].items() if k != "all"},
                "FID": r["fid"],
                "PSNR vs teacher (dB)": r.get("psnr_vs_reference"),
                "s / image": timed.get("s_per_image"),
            }
        )
    return pd.DataFrame(rows).round(3)


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """The ``n`` held-out prompts a quality measurement of ``n`` images draws (same ``seed``)."""
    return list(heldout(n, seed=seed).prompts)


def student_images(P: Profile, prompts: Sequence[str], *, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """One image per prompt from the teacher, then from the student (where it can load), same seeds: the
    images and the row labels. Image j starts from seed ``seed + j``, as image j of a quality measurement
    does. For the eye: nothing here is a measurement."""
    images, labels = [], []
    for scenario in quality_scenarios(P):
        pipe = load_pipeline(scenario.source, device=P.device, dtype=scenario.dtype)
        pipe.set_progress_bar_config(disable=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a student that cannot load is left out of the figure
            changes = apply(pipe, scenario.steps_list())
        if all(c.status == "applied" for c in changes):
            images.append(
                generate(pipe, list(prompts), steps=scenario.steps, guidance=DEFAULT_GUIDANCE, seed=seed)
            )
            labels.append(scenario.label)
        del pipe
        release_memory(P.device)
    return np.concatenate(images), labels


def student_info() -> dict:
    """What the shipped ``shapes`` student records about its training (``distill.json``), and the command
    that trains it again (``command``)."""
    path = VARIANTS_DIR / "student" / "distill.json"
    if not path.exists():
        return {"missing": "labkit/shapes/variants/student/distill.json", "command": STUDENT_COMMANDS["cpu"]}
    info = json.loads(path.read_text())
    kind = "gpu" if str(info.get("device", "")).startswith("cuda") else "cpu"
    return info | {"command": STUDENT_COMMANDS[kind]}


# ---------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------


def _find(records: Sequence[dict], label: str) -> dict | None:
    return next((r for r in records if r.get("label") == label), None)


def _ok(record: dict | None, key: str) -> bool:
    return record is not None and record.get("status") == "ok" and record.get(key) is not None


def _judge(value: float | None, low: float, high: float) -> str:
    """`labkit.book.judge`, with NaN or infinite ratios reported as not measured."""
    if value is None or not math.isfinite(value):
        return "not measured"
    return judge(value, low, high)


def verdict_rows(
    speed: Sequence[dict], costs: Sequence[dict], scores: Sequence[dict], student_speed: Sequence[dict] = ()
) -> list[dict]:
    """Verdict rows for "2-4x faster, smaller model, slight quality loss".

    ``speed``: records of `speed_scenarios` (time per image of a cut twin against its teacher);
    ``costs``: records of `cost_scenarios` (parameters, FLOPs; any twin, e.g. SD 1.5 counted on "meta");
    ``scores`` and ``student_speed``: records of `quality_scenarios` and `student_speed_scenarios`. "Slight"
    quality loss is read as a prompt-accuracy drop of at most 5 points (and no more than the noise of ``n``
    images if larger).
    """
    rows = []
    for cut in CUTS[1:]:
        base, new = _find(speed, "teacher"), _find(speed, cut)
        if _ok(base, "s_per_image") and _ok(new, "s_per_image"):
            ratio = base["s_per_image"] / new["s_per_image"]
            measured = (
                f"{ratio:.2f}x ({base['s_per_image']:.3g} -> {new['s_per_image']:.3g} s/image, "
                f"{base['source']}, {base['size']} px)"
            )
            verdict = _judge(ratio, 2, 4)
        else:
            measured, verdict = "not run here", "not measured"
        rows.append({"claim": f"2-4x faster: {cut}", "claimed": "2-4x", "measured": measured,
                     "verdict": verdict})  # fmt: skip
    for source in dict.fromkeys(r["source"] for r in costs):
        of_twin = [r for r in costs if r["source"] == source]
        base = _find(of_twin, "teacher")
        for cut in CUTS[1:]:
            new = _find(of_twin, cut)
            if base is None or new is None:
                continue
            flops = base["flops"] / new["flops"]
            rows.append(
                {
                    "claim": f"2-4x faster (FLOPs per UNet evaluation): {cut}, {source}",
                    "claimed": "2-4x",
                    "measured": f"{flops:.2f}x fewer FLOPs ({base['size']} px)",
                    "verdict": _judge(flops, 2, 4),
                }
            )
            smaller = 1 - new["parameters"] / base["parameters"]
            rows.append(
                {
                    "claim": f"smaller model: {cut}, {source}",
                    "claimed": "smaller",
                    "measured": f"{smaller:.0%} fewer UNet parameters "
                    f"({base['parameters'] / 1e6:.3g}M -> {new['parameters'] / 1e6:.3g}M)",
                    "verdict": "holds" if smaller > 0 else "does not hold",
                }
            )
    teacher, student = _find(scores, "teacher"), _find(scores, "student")
    if _ok(teacher, "prompt_accuracy") and _ok(student, "prompt_accuracy"):
        drop = teacher["prompt_accuracy"] - student["prompt_accuracy"]
        noise = match_margin(teacher["prompt_accuracy"], teacher["n"])
        slight = max(0.05, 2 * noise)
        if drop <= noise:
            verdict = "holds, and better: no loss beyond the noise"
        elif drop <= slight:
            verdict = "holds"
        else:
            verdict = "does not hold: more than a slight loss"
        rows.append(
            {
                "claim": "slight quality loss (shapes student)",
                "claimed": f"slight: accuracy drop <= {slight:.2f}",
                "measured": f"prompt accuracy {teacher['prompt_accuracy']:.3f} -> "
                f"{student['prompt_accuracy']:.3f}, FID {teacher['fid']:.1f} -> {student['fid']:.1f} "
                f"(n={teacher['n']}, {teacher['steps']} steps)",
                "verdict": verdict,
            }
        )
    else:
        why = (student or {}).get("reason") or (student or {}).get("error") or "not run"
        rows.append({"claim": "slight quality loss (shapes student)", "claimed": "slight",
                     "measured": why, "verdict": "not measured"})  # fmt: skip
    fast_teacher, fast_student = _find(student_speed, "teacher"), _find(student_speed, "student")
    if _ok(fast_teacher, "s_per_image") and _ok(fast_student, "s_per_image"):
        ratio = fast_teacher["s_per_image"] / fast_student["s_per_image"]
        rows.append(
            {
                "claim": "2-4x faster: shapes student",
                "claimed": "2-4x",
                "measured": f"{ratio:.2f}x ({fast_teacher['s_per_image']:.3g} -> "
                f"{fast_student['s_per_image']:.3g} s/image)",
                "verdict": _judge(ratio, 2, 4),
            }
        )
    return rows
