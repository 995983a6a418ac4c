"""Measurements of the distillation chapter (chapter 9): BK-SDM-style cuts and a distilled student.

Two questions, two sources:

- **speed at real scale**: the same architectural cut as BK-SDM (Kim et al., 2023) applied to a twin's
  UNet (random weights: speed, memory and FLOPs only). :func:`bk_cuts` gives the teacher's UNet config
  and its BK-SDM-Base and BK-SDM-Small cuts; for ``twin:sd15`` they are exactly ``twin:bk-sdm-base`` and
  ``twin:bk-sdm-small``, and for any other twin (the ``ci`` profile's ``twin:tiny``) the same rule;
  :func:`unet_costs` counts their parameters and FLOPs (on the "meta" device, so SD 1.5 at 512 px costs
  nothing to count) and times one UNet evaluation; :func:`cut_speed` times whole images.
- **quality**: only a trained student can say what a cut costs in pictures. :func:`student_quality`
  scores the ``shapes`` teacher and its distilled student (``labkit/shapes/variants/student``, trained by
  :mod:`labkit.shapes.distill`) on the same held-out prompts and seeds.

:func:`distillation_verdict` turns both into the verdict rows for the guide's
"2-4x faster, smaller model, slight quality loss".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from labkit import quality, tiers
from labkit.measure import benchmark, environment, image_check, release_memory
from labkit.models import load_pipeline, quiet_diffusers, twin_config
from labkit.shapes.distill import bk_layers, student_config
from labkit.tier1 import _unet_inputs, count_flops, match_margin, time_unet

CUTS = ("teacher", "BK-SDM-Base cut", "BK-SDM-Small cut")
"""The labels of :func:`bk_cuts`: the twin's own UNet, then BK-SDM-Base's and BK-SDM-Small's cuts."""


REAL_SCALE = "twin:sd15"
"""The twin whose cuts are BK-SDM's own (``twin:bk-sdm-base``, ``twin:bk-sdm-small``)."""


def twin_size(twin: str) -> int:
    """The native image side of a twin in pixels (512 for SD 1.5)."""
    return int(twin_config(twin.removeprefix("twin:"))["image_size"])


def bk_cuts(unet_config: dict) -> dict[str, dict]:
    """The teacher's UNet config and its two BK-SDM cuts (see :data:`CUTS`).

    BK-SDM-Base removes one residual + attention pair per stage (`labkit.shapes.distill.bk_layers`); BK-SDM-Small also
    removes the mid block. A per-stage list that is the same everywhere is written as one number, as
    diffusers' own configs do.
    """
    teacher = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    layers = bk_layers(teacher)
    base = student_config(teacher, layers, mid_block=True)
    small = student_config(teacher, layers, mid_block=False)
    for config in (base, small):
        if len(set(config["layers_per_block"])) == 1:
            config["layers_per_block"] = config["layers_per_block"][0]
    return dict(zip(CUTS, (teacher, base, small), strict=True))


def twin_cuts(twin: str) -> dict[str, dict]:
    """:func:`bk_cuts` of a twin's UNet (``"twin:sd15"`` or ``"sd15"``)."""
    return bk_cuts(twin_config(twin.removeprefix("twin:"))["unet"])


def unet_costs(
    twin: str,
    size: int,
    *,
    device: str,
    dtype: torch.dtype | str,
    repeats: int,
    warmup: int,
    batch: int = 2,
) -> list[dict]:
    """Parameters, FLOPs and time of one UNet evaluation for the teacher and each cut of ``twin``.

    ``batch=2`` is one sampling step with classifier-free guidance. FLOPs are counted on the "meta"
    device; ``repeats=0`` counts only (cheap at any scale). A UNet that does not fit gives
    ``status="oom"``. Used in the distillation chapter.
    """
    from diffusers import UNet2DConditionModel

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    factor = 2 ** (len(twin_config(twin.removeprefix("twin:"))["vae"]["block_out_channels"]) - 1)
    side = size // factor
    env = environment(torch.device(device)) if repeats > 0 else {}
    records = []
    for label, config in twin_cuts(twin).items():
        with torch.device("meta"):
            meta_unet = UNet2DConditionModel(**config)
            channels = meta_unet.config.in_channels
            inputs = _unet_inputs(meta_unet, batch, channels, side, "meta", torch.float32)
            flops = count_flops(lambda u=meta_unet, i=inputs: u(**i))
        record = {
            "label": label,
            "source": twin,
            "size": size,
            "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "layers_per_block": config.get("layers_per_block", 2),
            "mid_block": config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None,
            "parameters": sum(p.numel() for p in meta_unet.parameters()),
            "status": "ok",
            **{f"{k}_per_evaluation": v for k, v in flops.items()},
            **env,
        }
        del meta_unet
        if repeats > 0:
            try:
                timing = time_unet(
                    config, batch, channels, side, device=device, dtype=dtype, warmup=warmup, repeats=repeats
                )
                record |= {
                    "s_per_evaluation": timing["seconds"],
                    "times_s": timing["times_s"],
                    "peak_allocated_gb": timing["peak_allocated_gb"],
                }
            except torch.OutOfMemoryError as error:
                record |= {"status": "oom", "error": str(error).splitlines()[0]}
        records.append(record)
    return records


def cut_pipeline(twin: str, cut: str, *, device: str, dtype: torch.dtype | str, seed: int = 0):
    """The twin's pipeline with its UNet replaced by a cut of :func:`bk_cuts` (random weights)."""
    from diffusers import UNet2DConditionModel

    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}; choose one of {list(CUTS)}")
    pipe = load_pipeline(twin, device=device, dtype=dtype, seed=seed)
    if cut != "teacher":
        torch.manual_seed(seed)
        with torch.device(pipe.unet.device), quiet_diffusers():
            unet = UNet2DConditionModel(**twin_cuts(twin)[cut])
        tiers.distilled_student(pipe, unet=unet)
    return pipe


def cut_speed(
    twin: str,
    *,
    device: str,
    dtype: torch.dtype | str,
    size: int,
    steps: int,
    repeats: int,
    warmup: int,
    sampler: str = "DPM++ 2M",
) -> list[dict]:
    """Time per image and peak memory of the teacher and each cut, end to end (`labkit.benchmark`).

    Every pipeline uses ``sampler`` at ``steps`` steps, guidance as the pipeline's default. Used in the
    distillation chapter.
    """
    from labkit.tier1 import use_sampler

    records = []
    for cut in CUTS:
        pipe = cut_pipeline(twin, cut, device=device, dtype=dtype)
        use_sampler(pipe, sampler, steps)
        record = benchmark(
            pipe, steps=steps, size=size, repeats=repeats, warmup=warmup, label=cut, flops=False
        ).record
        record["unet_parameters"] = sum(p.numel() for p in pipe.unet.parameters())
        records.append(record)
        del pipe
        release_memory(device)
    return records


# ---------------------------------------------------------------------------------------------------
# quality on shapes


def student_quality(
    *,
    device: str,
    dtype: torch.dtype | str = "float32",
    steps: int,
    n: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
    sampler: str = "DPM++ 2M",
    student=None,
    keep: int = 0,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The ``shapes`` teacher and its distilled student on the same ``n`` held-out prompts and seeds.

    Each record holds prompt accuracy (and per attribute), FID, PSNR against the teacher's image of the
    same prompt and seed, UNet parameters, and seconds per image (`labkit.benchmark`, one image, with
    guidance). ``student`` is what ``tiers.distilled_student`` takes (default: the shipped student).
    Returns the records and, per label, the first ``keep`` images (to show them side by side). Used in
    the distillation chapter.
    """
    from labkit.tier1 import use_sampler

    records, reference, pictures = [], None, {}
    for label in ("teacher", "student"):
        pipe = load_pipeline("shapes", device=device, dtype=dtype)
        try:
            if label == "student":
                options = {} if student is None else {"unet": student}
                tiers.distilled_student(pipe, **options)
        except tiers.Unavailable as reason:
            records.append({"label": label, "status": "unavailable", "reason": str(reason)})
            continue
        use_sampler(pipe, sampler, steps)
        pipe.set_progress_bar_config(disable=True)
        scores = quality.evaluate(pipe, n=n, steps=steps, seed=seed, return_images=True)
        images = scores.pop("images")
        reference = images if reference is None else reference
        pictures[label] = images[:keep]
        timing = benchmark(pipe, steps=steps, repeats=repeats, warmup=warmup, label=label, flops=False).record
        check = image_check(images)
        records.append(
            {
                "label": label,
                "source": "shapes",
                "status": "nan" if check["nan_images"] else "ok",
                "sampler": sampler,
                "steps": steps,
                "n": n,
                "prompt_accuracy": scores["prompt_accuracy"],
                "accuracy": scores["accuracy"],
                "fid": scores["fid"],
                "psnr_vs_teacher": quality.psnr(reference, np.nan_to_num(images)),
                "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                "s_per_image": timing["s_per_image"],
                "dtype": str(pipe.unet.dtype).removeprefix("torch."),
                **environment(torch.device(device)),
            }
        )
        del pipe
        release_memory(device)
    return records, pictures


def scores_table(scores: Sequence[dict]):
    """The :func:`student_quality` records as a table. Used in the distillation chapter."""
    import pandas as pd

    rows = []
    for r in scores:
        if r.get("status") != "ok":
            rows.append({"UNet": r["label"], "status": r.get("status"), "note": r.get("reason", "")})
            continue
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
                "PSNR vs teacher (dB)": r["psnr_vs_teacher"],
                "s / image": r["s_per_image"],
            }
        )
    return pd.DataFrame(rows).round(3)


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """The ``n`` held-out prompts :func:`labkit.quality.evaluate` draws (same ``seed``)."""
    from labkit.shapes import heldout

    return list(heldout(n, seed=seed).prompts)


def student_info() -> dict:
    """What the shipped ``shapes`` student records about its training (``distill.json``), and the
    command that trains it again. Used in the distillation chapter."""
    import json

    from labkit.shapes import VARIANTS_DIR
    from labkit.shapes.distill import COMMANDS

    path = VARIANTS_DIR / "student" / "distill.json"
    if not path.exists():
        return {"missing": str(path), "command": COMMANDS["cpu"]}
    info = json.loads(path.read_text())
    kind = "gpu" if str(info.get("device", "")).startswith("cuda") else "cpu"
    return info | {"command": COMMANDS[kind]}


def cuts_table(costs: Sequence[dict], speed: Sequence[dict] = ()):
    """One row per UNet: parameters, FLOPs and time per evaluation, time per image, peak memory, each
    also as a ratio to the teacher of the same twin. Used in the distillation chapter."""
    import pandas as pd

    rows = []
    for r in costs:
        base = next(b for b in costs if b["label"] == "teacher" and b["source"] == r["source"])
        whole = next((s for s in speed if s["label"] == r["label"] and s["source"] == r["source"]), {})
        timed = whole.get("status") == "ok"
        s_eval, base_eval = r.get("s_per_evaluation"), base.get("s_per_evaluation")
        rows.append(
            {
                "twin": r["source"],
                "UNet": r["label"],
                "layers per stage": str(r["layers_per_block"]),
                "mid block": r["mid_block"],
                "parameters (M)": r["parameters"] / 1e6,
                "x fewer parameters": base["parameters"] / r["parameters"],
                "GFLOP / evaluation": r["flops_per_evaluation"] / 1e9,
                "x fewer FLOPs": base["flops_per_evaluation"] / r["flops_per_evaluation"],
                "s / evaluation": s_eval,
                "x faster (UNet)": base_eval / s_eval if s_eval and base_eval else None,
                "s / image": whole.get("s_per_image") if timed else None,
                "peak GB": whole.get("peak_allocated_gb") if timed else None,
            }
        )
    table = pd.DataFrame(rows)
    return table.dropna(axis="columns", how="all").round(3)


# ---------------------------------------------------------------------------------------------------
# the verdict


def _find(records: Sequence[dict], label: str) -> dict | None:
    return next((r for r in records if r.get("label") == label), None)


def _ok(record: dict | None, key: str) -> bool:
    return record is not None and record.get("status") == "ok" and record.get(key) is not None


def distillation_verdict(speed: Sequence[dict], costs: Sequence[dict], scores: Sequence[dict]) -> list[dict]:
    """Verdict rows for "2-4x faster, smaller model, slight quality loss" (the distillation chapter).

    ``speed``: :func:`cut_speed` records (time per image of a cut twin against its teacher);
    ``costs``: :func:`unet_costs` records (parameters, FLOPs; any twin, e.g. SD 1.5 counted on "meta");
    ``scores``: :func:`student_quality` records. "Slight" quality loss is read as a prompt-accuracy
    drop of at most 5 points (and no more than the noise of ``n`` images if larger).
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
            verdict = tiers_judge(ratio, 2, 4)
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
            flops = base["flops_per_evaluation"] / new["flops_per_evaluation"]
            rows.append(
                {
                    "claim": f"2-4x faster (FLOPs per UNet evaluation): {cut}, {source}",
                    "claimed": "2-4x",
                    "measured": f"{flops:.2f}x fewer FLOPs ({base['size']} px)",
                    "verdict": tiers_judge(flops, 2, 4),
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
        ratio = teacher["s_per_image"] / student["s_per_image"]
        rows.append(
            {
                "claim": "2-4x faster: shapes student",
                "claimed": "2-4x",
                "measured": f"{ratio:.2f}x ({teacher['s_per_image']:.3g} -> "
                f"{student['s_per_image']:.3g} s/image)",
                "verdict": tiers_judge(ratio, 2, 4),
            }
        )
    else:
        why = (student or {}).get("reason", "not run")
        rows.append({"claim": "slight quality loss (shapes student)", "claimed": "slight",
                     "measured": why, "verdict": "not measured"})  # fmt: skip
    return rows


def tiers_judge(value: float, low: float, high: float) -> str:
    """`labkit.lab.judge`, with NaN or infinite ratios reported as not measured."""
    from labkit.lab import judge

    if value is None or not math.isfinite(value):
        return "not measured"
    return judge(value, low, high)
