"""Chapter 1, samplers: seconds per image against steps on a twin, quality against steps on ``shapes``.

- `speed_scenarios`: each sampler at a few step counts on the profile's twin (and DDPM once at its
  full step count); `time_per_evaluation` fits their seconds against UNet evaluations;
- `quality_scenarios`: each sampler over the profile's step sweep on ``shapes`` (the same held-out
  prompts and seeds for every row), and `steps_to_match`;
- `sampler_images`: a few prompts through several samplers, for the eye (not a measurement);
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from labkit.book import Profile, fewer_is_better, find, judge, match_margin
from labkit.models import generate
from labkit.optimizations import SAMPLERS, use_sampler
from labkit.optimizations.samplers import sampler_step
from labkit.scenarios import Scenario

SPEED_SAMPLERS = ("PNDM", "DDIM", "Euler", "DPM++ 2M")
"""Timed at several step counts; the Karras and SDE variants only at the fast step count."""


def speed_steps(P: Profile) -> list[int]:
    """The step counts every sampler is timed at."""
    return sorted({max(2, P.fast_steps // 2), P.fast_steps, P.steps})


def _speed(P: Profile, name: str, steps: int, *, repeats: int, warmup: int) -> Scenario:
    return Scenario(
        kind="generate",
        source=P.twin,
        dtype=P.half_dtype,
        optimizations=(sampler_step(name, steps),),
        size=P.size,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        label=f"{name} {steps}",
        notes={"sampler": name},
    )


def speed_scenarios(P: Profile) -> list[Scenario]:
    """Seconds per image of each sampler on the twin, in the profile's half precision.

    DDPM runs once at its full step count, without a warm-up: it shares the warm pipeline of the others.
    """
    out = [
        _speed(P, n, s, repeats=P.repeats, warmup=P.warmup) for n in SPEED_SAMPLERS for s in speed_steps(P)
    ]
    out += [
        _speed(P, n, P.fast_steps, repeats=P.repeats, warmup=P.warmup)
        for n in ("DPM++ 2M Karras", "DPM++ 2M SDE")
    ]
    out.append(_speed(P, "DDPM", P.ddpm_steps, repeats=1, warmup=0))
    return out


def quality_steps(P: Profile) -> list[int]:
    """The step sweep of the quality section."""
    return sorted(set(P.sampler_steps) | {P.fast_steps, P.steps})


def quality_scenarios(P: Profile) -> list[Scenario]:
    """Prompt accuracy and FID of each sampler over the step sweep, on ``P.quality_images`` prompts."""
    names = [n for n in SAMPLERS if n != "DDPM"]
    grid = [(n, s) for n in names for s in quality_steps(P)]
    grid += [("DDPM", s) for s in sorted({P.steps, P.ddpm_steps})]
    return [
        Scenario(
            kind="quality",
            source=P.model,
            optimizations=(sampler_step(name, steps),),
            steps=steps,
            n=P.quality_images,
            label=f"{name} {steps}",
            notes={"sampler": name},
        )
        for name, steps in grid
    ]


def time_per_evaluation(records: Sequence[dict]) -> dict:
    """Fit ``seconds per image = fixed + per_evaluation x UNet evaluations`` over speed records.

    ``fixed`` is what every generation pays once (text encoder, VAE decode), ``per_evaluation`` the
    cost of one denoising step; ``max_residual`` is the largest distance of a record from the line,
    as a share of its time. All samplers on one line means that a sampler is faster only by needing
    fewer steps.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    x = np.array([r["denoiser_evaluations"] for r in ok], dtype=float)
    y = np.array([r["s_per_image"] for r in ok], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.abs(y - (intercept + slope * x)) / y
    return {
        "fixed_s": float(intercept),
        "per_evaluation_s": float(slope),
        "max_residual": float(residual.max()),
    }


def sampler_images(
    pipe, samplers: Sequence[tuple[str, int]], prompts: Sequence[str], *, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """One image per prompt for each ``(sampler, steps)``, same seeds: (rows x prompts) images, row labels.

    Image j of every row starts from the same noise (seed ``seed + j``), at the shapes model's own
    guidance. For the eye: nothing here is a measurement.
    """
    from labkit.quality import DEFAULT_GUIDANCE

    rows, labels = [], []
    for name, steps in samplers:
        use_sampler(pipe, name, steps)
        rows.append(generate(pipe, list(prompts), steps=steps, guidance=DEFAULT_GUIDANCE, seed=seed))
        labels.append(f"{name} {steps}")
    return np.concatenate(rows), labels


def steps_to_match(
    records: Sequence[dict],
    sampler: str,
    target: float,
    *,
    metric: str = "prompt_accuracy",
    margin: float = 0.0,
) -> int | None:
    """The fewest steps at which ``sampler`` reaches ``target`` on ``metric`` (within ``margin``).

    For ``prompt_accuracy`` (higher is better) a row matches when ``value >= target - margin``; for
    ``fid`` (lower is better) when ``value <= target + margin``. ``None`` when no row matches.
    """
    lower_is_better = metric == "fid"
    rows = sorted((r for r in records if r.get("sampler") == sampler), key=lambda r: r["steps"])
    for r in rows:
        value = r[metric]
        if (value <= target + margin) if lower_is_better else (value >= target - margin):
            return r["steps"]
    return None


def _f(value, spec: str = ".3g", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def verdict_rows(speed: Sequence[dict], scores: Sequence[dict], P: Profile) -> list[dict]:
    """The rows of the chapter's verdict, computed from its records with `labkit.book.judge`.

    ``speed`` are the records of `speed_scenarios`, ``scores`` those of `quality_scenarios`.
    """
    ddpm = find(speed, sampler="DDPM", steps=P.ddpm_steps)
    ddim_t = find(speed, sampler="DDIM", steps=P.steps)
    dpm_t = find(speed, sampler="DPM++ 2M", steps=P.fast_steps)
    pndm_t = find(speed, sampler="PNDM", steps=P.steps)
    ddim_q = find(scores, sampler="DDIM", steps=P.steps)
    dpm_q = find(scores, sampler="DPM++ 2M", steps=P.fast_steps)
    best = max(scores, key=lambda r: r["prompt_accuracy"])
    n = ddim_q["n"]
    margin = match_margin(ddim_q["prompt_accuracy"], n)
    share = _ratio(ddim_q["prompt_accuracy"], best["prompt_accuracy"])
    gap = dpm_q["prompt_accuracy"] - ddim_q["prompt_accuracy"]
    fid_ratio = _ratio(dpm_q["fid"], ddim_q["fid"])
    dpm_vs_ddim = _ratio(ddim_t["s_per_image"], dpm_t["s_per_image"])
    ddim_vs_ddpm = _ratio(ddpm["s_per_image"], ddim_t["s_per_image"])
    dpm_vs_ddpm = _ratio(ddpm["s_per_image"], dpm_t["s_per_image"])
    dpm_vs_pndm = _ratio(pndm_t["s_per_image"], dpm_t["s_per_image"])
    match_acc = steps_to_match(scores, "DPM++ 2M", ddim_q["prompt_accuracy"], margin=margin)
    match_fid = steps_to_match(scores, "DPM++ 2M", ddim_q["fid"], metric="fid", margin=0.1 * ddim_q["fid"])
    largest = max(r["steps"] for r in scores if r["sampler"] == "DPM++ 2M")
    if ddpm.get("peak_allocated_gb") is None:
        saved, saved_text = None, f"not measurable on this device ({ddpm['device']})"
    else:
        saved = 1 - dpm_t["peak_allocated_gb"] / ddpm["peak_allocated_gb"]
        saved_text = f"{saved:.0%} (DPM++ {P.fast_steps} against DDPM {P.ddpm_steps})"
    if match_acc is None:
        paper = f"does not hold: not reached within {largest} steps"
    else:
        paper = fewer_is_better(judge(match_acc, 15, 20))
    return [
        {
            "claim": f"DDIM {P.steps}: good balance",
            "claimed": "near the best quality (>= 95% of the best prompt accuracy)",
            "measured": f"{_f(share, '.0%')} of the best ({best['label']}: {best['prompt_accuracy']:.3f}); "
            f"{_f(ddim_vs_ddpm)}x faster than DDPM {P.ddpm_steps}",
            "verdict": judge(share, 0.95, 1.0, tolerance=0),
        },
        {
            "claim": f"DPM-Solver++ {P.fast_steps}: faster than DDIM {P.steps}",
            "claimed": "faster",
            "measured": f"{_f(dpm_vs_ddim)}x faster",
            "verdict": judge(dpm_vs_ddim, 1.0, math.inf, tolerance=0),
        },
        {
            "claim": f"DPM-Solver++ {P.fast_steps}: similar quality to DDIM {P.steps}",
            "claimed": f"prompt accuracy within the noise (±{margin:.3f} on {n} images)",
            "measured": f"{gap:+.3f} prompt accuracy; FID x{_f(fid_ratio, '.2f')}",
            "verdict": judge(gap, -margin, margin, tolerance=0),
        },
        {
            "claim": f"10-20x speed-up, against DDPM at {P.ddpm_steps} steps",
            "claimed": "10-20x",
            "measured": f"DDIM {P.steps}: {_f(ddim_vs_ddpm)}x; DPM++ {P.fast_steps}: {_f(dpm_vs_ddpm)}x",
            "verdict": f"DDIM: {judge(ddim_vs_ddpm, 10, 20)}; DPM++: {judge(dpm_vs_ddpm, 10, 20)}",
        },
        {
            "claim": f"10-20x speed-up, against PNDM {P.steps} (SD 1.x's default)",
            "claimed": "10-20x",
            "measured": f"DPM++ {P.fast_steps}: {_f(dpm_vs_pndm)}x",
            "verdict": judge(dpm_vs_pndm, 10, 20),
        },
        {
            "claim": "30% memory reduction",
            "claimed": "30% less peak memory",
            "measured": saved_text,
            "verdict": judge(saved, 0.3),
        },
        {
            "claim": "DPM-Solver++ paper: DDIM's 50-step quality in 15-20 steps",
            "claimed": "15-20 steps",
            "measured": f"to match DDIM {P.steps}: {_f(match_acc)} steps (prompt accuracy), "
            f"{_f(match_fid)} steps (FID within 10%)",
            "verdict": paper,
        },
    ]
