"""The decision matrix and the performance summary (chapters 10 and 11).

Chapter 10 measures the guide's four use cases, the presets ``latency``, ``quality``, ``memory`` and
``throughput`` of `labkit.tiers.PRESETS`, against the guide's "Expected" lines; chapter 11 maps the
guide's complete optimization stack line by line to what runs today and reproduces the guide's
performance-summary table (Baseline, Tier 1, Tier 1+2, Tier 1+2+3) beside the guide's own numbers.

A preset is run *as the profile allows* (`adapt`): its step counts are scaled by the profile
(``P.steps / 50``: the guide's 50 steps are ``P.steps``), fp16 becomes the profile's reduced precision
(bfloat16 on a CPU), ``torch_compile`` is dropped where the profile has compilation off, and the guide's
1024 px and batch 16 become ``P.large_size`` and the largest of ``P.batch_sizes``. Every such change is
written into the record (``adapted``); a step that cannot run is an ``unavailable`` entry with its
reason, never a silent omission.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from labkit import measure
from labkit.tiers import OPTIMIZATIONS, PRESETS, Change, apply

GUIDE_SETUP = {"source": "twin:sd15", "size": 512}
"""The setup the guide's absolute numbers (seconds per image) refer to: SD 1.5 at 512x512 px."""

GUIDE_STEPS = 50
"""The guide's reference step count; a profile's ``steps`` stands for it (`scale_steps`)."""

NOT_MEASURABLE = "not measurable on this device"


# ---------------------------------------------------------------------------------------------------
# The use cases of the decision matrix (the guide's text, verbatim)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UseCase:
    """One use case of the guide's decision matrix and the labkit preset that implements it."""

    preset: str
    title: str
    """The guide's heading."""
    question: str
    """The question a reader asks when this is the use case to pick."""
    config: str
    """The guide's configuration block, verbatim."""
    expected: str
    """The guide's "Expected" line, verbatim."""


USE_CASES: dict[str, UseCase] = {
    u.preset: u
    for u in [
        UseCase(
            "latency",
            "Real-Time Generation (Latency Priority)",
            "How fast can one image come back to a waiting user?",
            "scheduler = DPMSolverMultistepScheduler(...)\nnum_steps = 10-20\n"
            "precision = torch.float16\nenable_xformers = True\ncompile_model = True",
            "<1 second per image (512×512)",
        ),
        UseCase(
            "quality",
            "High Quality (Quality Priority)",
            "What is the best image I can get, if I can wait a few seconds?",
            'scheduler = DDIMScheduler(beta_schedule="cosine")\nnum_steps = 100\n'
            "precision = torch.float16\nguidance_scale = 12.0\nuse_tuned_vae = True",
            "Best quality, ~5 seconds per image",
        ),
        UseCase(
            "memory",
            "Memory Constrained (4-6GB VRAM)",
            "Will it run at all on my small GPU?",
            "enable_cpu_offload = True\nenable_vae_tiling = True\nenable_attention_slicing = True\n"
            "precision = torch.float16\nnum_steps = 50",
            "Runs on low-end GPUs, moderate speed",
        ),
        UseCase(
            "throughput",
            "Batch Processing (Throughput Priority)",
            "How many images per second, when nobody waits for one image?",
            "batch_size = 16\nprecision = torch.float16\nenable_xformers = True\n"
            "compile_model = True\nnum_steps = 50",
            "Maximum images/second",
        ),
    ]
}

MEMORY_CLAIM_GB = (4.0, 6.0)
"""The guide's "4-6GB VRAM"."""

LATENCY_CLAIM_S = 1.0
"""The guide's "<1 second per image (512×512)"."""

QUALITY_CLAIM_S = 5.0
"""The guide's "~5 seconds per image" (judged within +-50%: "about")."""


# ---------------------------------------------------------------------------------------------------
# Running a preset as the profile allows
# ---------------------------------------------------------------------------------------------------


def scale_steps(steps: int, profile) -> int:
    """The guide's step count on ``profile``: ``steps * P.steps / 50`` (the identity on ``gpu``)."""
    return max(1, round(steps * profile.steps / GUIDE_STEPS))


@dataclass
class Plan:
    """A preset adapted to a profile: the steps to apply, the call settings, what was changed and why."""

    preset: str
    steps: list[tuple[str, dict]]
    call: dict
    dropped: list[Change]
    adapted: list[str]


def adapt(preset: str, profile) -> Plan:
    """Adapt preset ``preset`` to ``profile`` (see the module docstring); nothing is dropped silently."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    spec = PRESETS[preset]
    steps, dropped, adapted = [], [], []
    for name, options in spec.steps:
        options = dict(options)
        if "steps" in options and profile.steps != GUIDE_STEPS:
            new = scale_steps(options["steps"], profile)
            adapted.append(f"{name} steps {options['steps']} -> {new} (x P.steps/{GUIDE_STEPS})")
            options["steps"] = new
        if name == "fp16" and profile.half_dtype == "bfloat16":
            adapted.append("fp16 -> bf16 (the profile's reduced precision, P.half_dtype)")
            name = "bf16"
        if name == "torch_compile" and not profile.compile:
            reason = f"profile {profile.name} has compilation off (P.compile is False: minutes here)"
            dropped.append(Change(name, "unavailable", reason, options))
            continue
        steps.append((name, options))
    call = dict(spec.call)
    if "steps" in call and profile.steps != GUIDE_STEPS:
        adapted.append(f"steps {call['steps']} -> {scale_steps(call['steps'], profile)}")
        call["steps"] = scale_steps(call["steps"], profile)
    if call.get("size", 0) > profile.size and call["size"] != profile.large_size:
        adapted.append(f"size {call['size']} -> {profile.large_size} (P.large_size)")
        call["size"] = profile.large_size
    if call.get("batch", 1) > max(profile.batch_sizes):
        adapted.append(f"batch {call['batch']} -> {max(profile.batch_sizes)} (largest of P.batch_sizes)")
        call["batch"] = max(profile.batch_sizes)
    return Plan(preset, steps, call, dropped, adapted)


def prepare(pipe, preset: str, profile) -> list[Change]:
    """Apply preset ``preset`` to ``pipe`` as ``profile`` allows (`adapt`); returns every `Change`."""
    plan = adapt(preset, profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unavailable steps are in the changes and the record
        changes = apply(pipe, plan.steps)
    pipe.labkit_applied = [*pipe.labkit_applied, *plan.dropped]
    pipe.labkit_preset = preset
    pipe.labkit_call = {**getattr(pipe, "labkit_call", {}), **plan.call}
    pipe.labkit_adapted = plan.adapted
    return changes + plan.dropped


def plan_table(presets: Sequence[str], profile):
    """What each preset runs on ``profile``: its steps, its call settings, what was adapted or dropped."""
    import pandas as pd

    rows = []
    for name in presets:
        plan = adapt(name, profile)
        steps = ", ".join(n + (f"({_options(o)})" if o else "") for n, o in plan.steps)
        rows.append(
            {
                "preset": name,
                "optimizations": steps,
                "call": _options(plan.call),
                "adapted to the profile": "; ".join(plan.adapted) or "-",
                "dropped": "; ".join(f"{c.name}: {c.what}" for c in plan.dropped) or "-",
            }
        )
    return pd.DataFrame(rows)


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _unhook(pipe) -> torch.device:
    """Remove offload hooks and compiled code before ``pipe`` is dropped; returns its device."""
    device = pipe._execution_device
    compiled = any(c.name == "torch_compile" and c.status == "applied" for c in pipe.labkit_applied)
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    if compiled:  # its compiled code must not count against the next configuration
        torch._dynamo.reset()
    return device


def cap_problem(profile) -> str | None:
    """Why GPU memory cannot be capped on ``profile`` (None when it can)."""
    if profile.memory_cap_gb is None or not str(profile.device).startswith("cuda"):
        return f"profile {profile.name} runs on {profile.device}: there is no GPU memory to cap"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def measure_preset(
    load: Callable[[], object],
    preset: str,
    profile,
    *,
    batches: Sequence[int] | None = None,
    caps: Sequence[float | None] = (None,),
    size: int | str | None = None,
    label: str | None = None,
) -> list[dict]:
    """Benchmark preset ``preset`` on a fresh pipeline from ``load()`` (chapters 10 and 11).

    One record per batch size (default: the preset's batch, else 1). ``size`` defaults to the preset's,
    else ``P.size``; ``"native"`` is the model's own (1024 for SDXL). Caps (GB) run from the smallest
    up, and a batch that fitted under a cap is not run under larger ones. Records carry the preset,
    what was adapted to the profile and the unavailable steps; out of memory and errors are records.
    """
    pipe = load()
    prepare(pipe, preset, profile)
    call = pipe.labkit_call
    if size == "native":
        from labkit.models import native_size

        size = native_size(pipe)
    size = size or call.get("size") or profile.size
    steps = call.get("steps")
    records = []
    caps = sorted(caps, key=lambda c: float("inf") if c is None else c)
    for batch in batches or [call.get("batch", 1)]:
        for cap in caps:
            record = measure._measure_one(
                pipe, label or preset, size, cap, steps=steps, batch=batch,
                repeats=profile.repeats, warmup=profile.warmup, flops=False, breakdown=False,
            )  # fmt: skip
            extra = {k: v for k, v in measure.describe(pipe).items() if k not in record}
            record |= extra | {"preset": preset, "batch": batch, "adapted": pipe.labkit_adapted}
            record.setdefault("source", getattr(pipe, "labkit_source", None))
            record.setdefault("steps", steps)
            records.append(record)
            if record["status"] == "ok":
                break
    device = _unhook(pipe)
    del pipe
    measure.release_memory(device)
    return records


def preset_quality(
    pipe, preset: str, profile, *, n: int | None = None, seed: int = 0, label: str | None = None
) -> dict:
    """Prompt accuracy (and FID) on ``shapes`` of preset ``preset`` applied to a copy of ``pipe``.

    ``pipe`` (the shapes pipeline, loaded once) is not changed. The steps and guidance are the preset's,
    as adapted to ``profile``; the images are ``n`` (default ``P.quality_images``) held-out prompts.
    """
    from labkit import quality

    work = copy.deepcopy(pipe)
    work.set_progress_bar_config(disable=True)
    prepare(work, preset, profile)
    call = work.labkit_call
    steps = call.get("steps") or scale_steps(GUIDE_STEPS, profile)
    guidance = call.get("guidance", quality.DEFAULT_GUIDANCE)
    try:
        with measure._without_known_notes():
            scores = quality.evaluate(
                work, n=n or profile.quality_images, steps=steps, guidance=guidance, seed=seed,
                batch_size=call.get("batch", 100),
            )  # fmt: skip
        status = "ok"
    except (RuntimeError, torch.OutOfMemoryError) as error:
        scores, status = {"error": str(error).strip().splitlines()[0]}, "error"
    record = {
        "label": label or preset,
        "preset": preset,
        "status": status,
        "source": getattr(pipe, "labkit_source", None),
        **measure.describe(work),
        "adapted": work.labkit_adapted,
        **{k: v for k, v in scores.items() if k != "accuracy"},
        "steps": steps,
        "guidance": guidance,
        **measure.environment(work._execution_device),
    }
    device = _unhook(work)
    del work
    measure.release_memory(device)
    return record


# ---------------------------------------------------------------------------------------------------
# Chapter 10: the decision matrix
# ---------------------------------------------------------------------------------------------------


def _find(records: Sequence[dict], preset: str, **match) -> dict | None:
    found = [r for r in records if r.get("preset") == preset and all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def best_throughput(records: Sequence[dict], preset: str = "throughput") -> dict | None:
    """The measured record of ``preset`` with the most images per second (the batch sweep's best)."""
    ok = [r for r in records if r.get("preset") == preset and measure.measured(r)]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def comparable(record: dict | None) -> bool:
    """Whether a speed record measured the setup the guide's seconds refer to (SD 1.5, 512 px)."""
    return record is not None and all(record.get(k) == v for k, v in GUIDE_SETUP.items())


def _setup(record: dict) -> str:
    return f"{record.get('source')} at {record.get('size')} px"


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def matrix_table(records: Sequence[dict], scores: Sequence[dict]):
    """The decision matrix: the four use cases side by side, as measured (chapter 10).

    ``records`` are speed records (`measure_preset`; the throughput preset's best batch is shown),
    ``scores`` quality records on shapes (`preset_quality`).
    """
    import pandas as pd

    rows = []
    for name, case in USE_CASES.items():
        r = best_throughput(records) if name == "throughput" else _find(records, name, batch=1)
        r = r or _find(records, name) or {}
        q = _find(scores, name) or {}
        ok = measure.measured(r) if r else False
        rows.append(
            {
                "use case": case.title,
                "question it answers": case.question,
                "preset": name,
                "status": r.get("status", "not run"),
                "steps": r.get("steps"),
                "batch": r.get("batch"),
                "s / image": r.get("s_per_image") if ok else None,
                "images / s": r.get("images_per_s") if ok else None,
                "peak GB": r.get("peak_allocated_gb") if ok else None,
                "memory cap GB": r.get("memory_cap_gb"),
                "prompt accuracy (shapes)": q.get("prompt_accuracy"),
                "not applied here": "; ".join(r.get("unavailable", [])) or "-",
                "the guide expects": case.expected,
            }
        )
    return pd.DataFrame(rows)


def matrix_verdict(records: Sequence[dict], scores: Sequence[dict]) -> list[dict]:
    """Verdict rows for the guide's four "Expected" lines, computed from the records (chapter 10)."""
    from labkit.lab import judge

    rows = []
    latency = _find(records, "latency", batch=1)
    measured = _fmt(latency and latency.get("s_per_image"), ".3g", " s/image")
    if latency and measure.measured(latency) and comparable(latency):
        verdict = judge(latency["s_per_image"], 0, LATENCY_CLAIM_S, tolerance=0)
    else:
        verdict = NOT_MEASURABLE
        if latency:
            measured += f" ({_setup(latency)}, not SD 1.5 at 512 px)"
    rows.append({"claim": "latency: " + USE_CASES["latency"].expected, "claimed": "< 1 s",
                 "measured": measured, "verdict": verdict})  # fmt: skip

    good = _find(records, "quality", batch=1)
    measured = _fmt(good and good.get("s_per_image"), ".3g", " s/image")
    if good and measure.measured(good) and comparable(good):
        verdict = judge(good["s_per_image"], QUALITY_CLAIM_S, tolerance=0.5)
    else:
        verdict = NOT_MEASURABLE
        if good:
            measured += f" ({_setup(good)}, not SD 1.5 at 512 px)"
    rows.append({"claim": "quality: ~5 seconds per image", "claimed": "about 5 s",
                 "measured": measured, "verdict": verdict})  # fmt: skip

    accuracy = {s["preset"]: s.get("prompt_accuracy") for s in scores if s.get("status") == "ok"}
    if accuracy.get("quality") is not None and len(accuracy) > 1:
        best = max(accuracy.values())
        others = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items() if k != "quality")
        measured = f"quality {accuracy['quality']:.3f}; {others}"
        verdict = "holds" if accuracy["quality"] >= best else "does not hold"
    else:
        measured, verdict = "no shapes scores", "not measured"
    rows.append({"claim": "quality: best quality (prompt accuracy on shapes)",
                 "claimed": "highest of the four", "measured": measured, "verdict": verdict})  # fmt: skip

    memory = [r for r in records if r.get("preset") == "memory"]
    capped = [r for r in memory if r.get("memory_cap_gb") is not None]
    fitted = [r for r in capped if r["status"] == "ok"]
    if fitted:
        r = fitted[0]
        measured = (f"fits under {r['memory_cap_gb']:g} GB: peak {r['peak_allocated_gb']:.2f} GB "
                    f"(reserved {r['peak_reserved_gb']:.2f}), {r['s_per_image']:.3g} s/image")  # fmt: skip
        verdict = judge(r["peak_reserved_gb"], 0, max(MEMORY_CLAIM_GB), tolerance=0)
    elif capped:
        measured = "; ".join(f"{r['status']} under {r['memory_cap_gb']:g} GB" for r in capped)
        verdict = "does not hold"
    else:
        measured, verdict = "no GPU memory cap on this device", NOT_MEASURABLE
    rows.append({"claim": "memory: runs on a 4-6 GB GPU", "claimed": "fits under 4-6 GB",
                 "measured": measured, "verdict": verdict})  # fmt: skip

    best = best_throughput(records)
    singles = {
        r["preset"]: r["images_per_s"]
        for r in records
        if r.get("preset") in ("latency", "quality", "memory")
        and r.get("batch") == 1
        and r.get("images_per_s") is not None
    }
    if best is not None and singles:
        others = ", ".join(f"{k} {v:.3g}" for k, v in singles.items())
        measured = f"{best['images_per_s']:.3g} images/s at batch {best['batch']}; batch 1 of {others}"
        verdict = "holds" if best["images_per_s"] >= max(singles.values()) else "does not hold"
    else:
        measured, verdict = "no throughput records", "not measured"
    rows.append({"claim": "throughput: maximum images/second", "claimed": "most images/s of the four",
                 "measured": measured, "verdict": verdict})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------
# Chapter 11: the complete stack, line by line
# ---------------------------------------------------------------------------------------------------

GUIDE_STACK: list[tuple[str, str]] = [
    ('pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1",', "load"),
    ("    torch_dtype=torch.float16,  # Tier 1: FP16", "fp16"),
    ("    scheduler=DPMSolverMultistepScheduler.from_pretrained(  # Tier 1: Fast sampler", "dpm_solver"),
    ('    vae=AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse")  # Tier 1: Tuned VAE', "swap_vae"),
    ("pipe.enable_model_cpu_offload()", "model_cpu_offload"),
    ("pipe.enable_vae_tiling()", "vae_tiling"),
    ("pipe.enable_xformers_memory_efficient_attention()", "xformers"),
    ('pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")', "torch_compile"),
    ("    num_inference_steps=20,  # Tier 1: Reduced steps", "call:steps"),
    ("    guidance_scale=7.5,", "call:guidance"),
    ("    height=1024,", "call:size"),
    ("    width=1024", "call:size"),
]
"""The guide's complete optimization stack, verbatim, one line each, with what implements the line:
a `labkit.tiers` optimization of ``PRESETS["complete"]``, ``load`` (`labkit.load_pipeline`) or
``call:KEY`` (a call setting of the preset)."""

_MODERN = {
    "load": "labkit.load_pipeline(source): a twin of the architecture, or the shapes model",
    "vae_tiling": "pipe.vae.enable_tiling() (pipe.enable_vae_tiling() is deprecated)",
}


def stack_table(pipe, changes: Sequence[Change], profile=None):
    """The guide's complete stack line by line: the guide's code, the labkit step, status here (chapter 11).

    ``changes`` are what `labkit.apply` (or `prepare`) returned for ``PRESETS["complete"]`` on ``pipe``.
    """
    import pandas as pd

    by_name = {c.name: c for c in changes}
    if "bf16" in by_name and "fp16" not in by_name:  # adapted to the profile's reduced precision
        by_name["fp16"] = by_name["bf16"]
    call = getattr(pipe, "labkit_call", {})
    preset = dict(PRESETS["complete"].steps)
    rows = []
    for line, target in GUIDE_STACK:
        if target == "load":
            step = "labkit.load_pipeline"
            status = f"applied: {getattr(pipe, 'labkit_source', '?')} loaded"
        elif target.startswith("call:"):
            key = target.removeprefix("call:")
            step = f"preset call setting {key}"
            status = f"applied: {key} = {call.get(key)}"
        else:
            options = ", ".join(f"{k}={v}" for k, v in preset.get(target, {}).items())
            step = f"{target}({options})"
            change = by_name.get(target)
            if change is None:
                status = "not applied"
            elif change.status == "applied":
                status = f"applied: {change.what}"
            else:
                status = f"UNAVAILABLE: {change.what}"
            if change is not None and change.name != target:
                status += f" ({change.name}: the profile's precision)"
        what = _MODERN.get(target) or (
            OPTIMIZATIONS[target].summary if target in OPTIMIZATIONS else "the pipeline call"
        )
        rows.append({"the guide's code": line, "labkit step": step, "today": what,
                     "status on this device": status})  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# Chapter 11: the performance summary
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    """One row of the guide's performance summary, as the guide prints it."""

    configuration: str
    preset: str
    speedup: float
    memory_gb: float
    quality_pct: float
    use_case: str


GUIDE_SUMMARY: list[SummaryRow] = [
    SummaryRow("Baseline", "baseline", 1, 8, 100, "Reference"),
    SummaryRow("Tier 1", "tier1", 15, 2, 98, "Standard"),
    SummaryRow("Tier 1+2", "tier1+2", 25, 1.5, 98, "Production"),
    SummaryRow("Tier 1+2+3", "tier1+2+3", 40, 1, 95, "Edge/Mobile"),
]
"""The guide's "Performance Summary" table: speed (x), memory (GB), quality (%), use case."""


def summary_rows(records: Sequence[dict], scores: Sequence[dict], source: str) -> list[dict]:
    """Our numbers for each row of the guide's summary, on twin ``source`` and on shapes (chapter 11).

    Speed is the baseline's seconds per image over the row's; memory is the peak GB allocated;
    quality is the prompt accuracy on shapes as a percentage of the baseline preset's.
    """
    speed = {r["preset"]: r for r in records if r.get("source") == source}
    quality = {s["preset"]: s for s in scores if s.get("status") == "ok"}
    base, base_q = speed.get("baseline"), quality.get("baseline")
    rows = []
    for g in GUIDE_SUMMARY:
        r, q = speed.get(g.preset), quality.get(g.preset)
        ok = r is not None and measure.measured(r)
        base_ok = base is not None and measure.measured(base)
        rows.append(
            {
                "configuration": g.configuration,
                "preset": g.preset,
                "source": source,
                "status": r["status"] if r else "not run",
                "s_per_image": r["s_per_image"] if ok else None,
                "speedup": base["s_per_image"] / r["s_per_image"] if ok and base_ok else None,
                "peak_allocated_gb": r.get("peak_allocated_gb") if ok else None,
                "prompt_accuracy": q.get("prompt_accuracy") if q else None,
                "quality_pct": 100 * q["prompt_accuracy"] / base_q["prompt_accuracy"]
                if q and base_q and base_q.get("prompt_accuracy")
                else None,
                "denoiser_evaluations": r.get("denoiser_evaluations") if ok else None,
                "unavailable": list(r.get("unavailable", [])) if r else [],
                "quality_unavailable": list(q.get("unavailable", [])) if q else [],
                "applied": list(r.get("applied", [])) if r else [],
                "device": r.get("device") if r else None,
                "size": r.get("size") if r else None,
            }
        )
    return rows


def summary_table(rows: Sequence[dict]):
    """The guide's performance summary beside ours (rows from `summary_rows`), one line per row."""
    import pandas as pd

    guide = {g.preset: g for g in GUIDE_SUMMARY}
    out = []
    for r in rows:
        g = guide[r["preset"]]
        out.append(
            {
                "configuration": g.configuration,
                "measured on": f"{r['source']} at {r['size']} px" if r["size"] else r["source"],
                "speed (guide)": f"{g.speedup:g}×",
                "speed (ours)": _fmt(r["speedup"], ".2f", "×") if r["status"] == "ok" else r["status"],
                "memory (guide)": f"{g.memory_gb:g}GB",
                "memory (ours)": _fmt(r["peak_allocated_gb"], ".2f", "GB")
                if r["peak_allocated_gb"] is not None
                else "no GPU memory here",
                "quality (guide)": f"{g.quality_pct:g}%",
                "quality (ours, shapes)": _quality_cell(r),
                "use case": g.use_case,
            }
        )
    return pd.DataFrame(out)


def _quality_cell(r: dict) -> str:
    if r["quality_pct"] is not None:
        return f"{r['quality_pct']:.0f}% (accuracy {r['prompt_accuracy']:.2f})"
    if r["prompt_accuracy"] is not None:
        return f"accuracy {r['prompt_accuracy']:.2f} (baseline's is 0)"
    return "-"


def _names(entries: Sequence[str]) -> list[str]:
    return [e.split(":")[0].split("(")[0] for e in entries]


def why_different(rows: Sequence[dict], tolerance: float = 0.25) -> list[dict]:
    """For each number of ours that differs from the guide's by more than ``tolerance`` (relative), the
    reasons that the records show (chapter 11): what could not run, the setup, the step count, offloading.
    """
    guide = {g.preset: g for g in GUIDE_SUMMARY}
    base = next((r for r in rows if r["preset"] == "baseline"), None)
    out = []
    for r in rows:
        g = guide[r["preset"]]
        skipped = _names(r["unavailable"])
        applied = _names(r["applied"])
        common = []
        if skipped:
            common.append(f"not applied here: {', '.join(skipped)}")
        if r["source"] != GUIDE_SETUP["source"] or r["size"] != GUIDE_SETUP["size"]:
            common.append(f"measured on {r['source']} at {r['size']} px (the guide: SD at 512 px)")
        if g.preset != "baseline" and r["speedup"] is not None:
            if abs(r["speedup"] - g.speedup) > tolerance * g.speedup:
                why = list(common)
                evals = base and base.get("denoiser_evaluations")
                if evals and r.get("denoiser_evaluations"):
                    steps_gain = evals / r["denoiser_evaluations"]
                    why.append(
                        f"fewer UNet calls alone give {steps_gain:.2f}× ({evals} -> "
                        f"{r['denoiser_evaluations']}); the rest is {r['speedup'] / steps_gain:.2f}×"
                    )
                if "model_cpu_offload" in applied:
                    why.append("model CPU offload moves each model to the GPU for every image (time)")
                if "attention_slicing" in applied:
                    why.append("attention slicing on top of SDPA brings back classic attention (ch. 4)")
                if r["device"] and "CPU" in r["device"]:
                    why.append("on a CPU, reduced precision and fused attention gain little")
                out.append({"configuration": g.configuration, "column": "speed",
                            "guide": f"{g.speedup:g}×", "ours": f"{r['speedup']:.2f}×",
                            "why": "; ".join(why) or "no recorded reason"})  # fmt: skip
        if r["peak_allocated_gb"] is None and r["status"] == "ok":
            out.append({"configuration": g.configuration, "column": "memory",
                        "guide": f"{g.memory_gb:g}GB", "ours": "-",
                        "why": "no GPU memory on this device (a CPU run)"})  # fmt: skip
        elif r["peak_allocated_gb"] is not None:
            if abs(r["peak_allocated_gb"] - g.memory_gb) > tolerance * g.memory_gb:
                why = list(common)
                if "model_cpu_offload" in applied:
                    why.append("offloading keeps only the running model on the GPU")
                out.append({"configuration": g.configuration, "column": "memory",
                            "guide": f"{g.memory_gb:g}GB", "ours": f"{r['peak_allocated_gb']:.2f}GB",
                            "why": "; ".join(why) or "the guide does not say what it measured"})  # fmt: skip
        if r["quality_pct"] is not None and abs(r["quality_pct"] - g.quality_pct) > 2:
            missing = _names(r["quality_unavailable"])
            why = [f"not applied to shapes here: {', '.join(missing)}"] if missing else []
            why.append(f"prompt accuracy on shapes ({r['prompt_accuracy']:.3f}); the guide names no metric")
            out.append({"configuration": g.configuration, "column": "quality",
                        "guide": f"{g.quality_pct:g}%", "ours": f"{r['quality_pct']:.0f}%",
                        "why": "; ".join(why)})  # fmt: skip
    return out


def summary_verdict(rows: Sequence[dict]) -> list[dict]:
    """Verdict rows for the guide's performance summary (chapter 11): speed and memory where the setup
    is the guide's (SD 1.5 at 512 px; else "not measurable"), quality on shapes everywhere."""
    from labkit.lab import judge

    guide = {g.preset: g for g in GUIDE_SUMMARY}
    out = []
    for r in rows:
        g = guide[r["preset"]]
        if g.preset == "baseline":
            continue
        same = comparable(r)
        where = "" if same else f" ({r['source']} at {r['size']} px, not SD 1.5 at 512 px)"
        speed = r["speedup"]
        out.append(
            {
                "claim": f"{g.configuration}: speed vs baseline",
                "claimed": f"{g.speedup:g}×",
                "measured": (f"{speed:.2f}×" if speed is not None else r["status"]) + where,
                "verdict": judge(speed, g.speedup) if same else NOT_MEASURABLE,
            }
        )
        memory = r["peak_allocated_gb"]
        out.append(
            {
                "claim": f"{g.configuration}: peak memory",
                "claimed": f"{g.memory_gb:g} GB",
                "measured": (f"{memory:.2f} GB" if memory is not None else "no GPU memory") + where,
                "verdict": judge(memory, g.memory_gb) if same and memory is not None else NOT_MEASURABLE,
            }
        )
    for r in rows:
        g = guide[r["preset"]]
        if g.preset == "baseline" or r["source"] != rows[0]["source"]:
            continue
        out.append(
            {
                "claim": f"{g.configuration}: quality vs baseline (prompt accuracy on shapes)",
                "claimed": f"{g.quality_pct:g}%",
                "measured": _quality_cell(r),
                "verdict": judge(r["quality_pct"], g.quality_pct, tolerance=0.02),
            }
        )
    return out
