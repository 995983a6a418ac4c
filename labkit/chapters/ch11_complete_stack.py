"""Chapter 11, the complete stack: the guide's stack line by line, and its performance summary reproduced.

Presets run as the profile allows (`labkit.book.adapt_preset`: step counts scaled, fp16 as the profile's
reduced precision, the steps that cannot run here dropped with their reason and listed in each record's
``unavailable``).

- `GUIDE_STACK`, `stack_table`: the guide's complete optimization stack, each line mapped to the labkit
  step that implements it today, and its status on a pipeline;
- `complete_scenario`: the ``complete`` preset timed on the twin at the profile's large size;
- `GUIDE_SUMMARY`, `summary_plans`, `summary_scenarios`, `quality_scenarios`: the guide's performance
  summary (Baseline, Tier 1, Tier 1+2, Tier 1+2+3) measured on the twins and scored on ``shapes``;
- `summary_rows`, `summary_table`, `why_different`: our numbers beside the guide's, and the reasons the
  records give for each difference;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from labkit.book import PresetPlan, Profile, adapt_preset, judge, preset_scenario
from labkit.measurement import measured
from labkit.optimizations import OPTIMIZATIONS, PRESETS, Change
from labkit.scenarios import Scenario

GUIDE_SETUP = {"source": "twin:sd15", "size": 512}
"""The setup the guide's absolute numbers refer to: SD 1.5 at 512x512 px."""

NOT_MEASURABLE = "not measurable on this device"

# ---------------------------------------------------------------------------------------------------
# The complete stack, line by line
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
an optimization of ``PRESETS["complete"]``, ``load`` (`labkit.load_pipeline`) or ``call:KEY`` (a call
setting of the preset)."""

_MODERN = {
    "load": "labkit.load_pipeline(source): a twin of the architecture, or the shapes model",
    "vae_tiling": "pipe.vae.enable_tiling() (pipe.enable_vae_tiling() is deprecated)",
}


def stack_table(pipe, changes: Sequence[Change]):
    """The guide's complete stack line by line: the guide's code, the labkit step, its status on ``pipe``.

    ``changes`` are what `labkit.apply` returned for ``PRESETS["complete"]`` (or for the steps of its
    `labkit.book.adapt_preset` plan) on ``pipe``.
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


def complete_scenario(P: Profile) -> Scenario:
    """The whole stack (``PRESETS["complete"]``) timed on the twin, as the profile allows it."""
    return preset_scenario(adapt_preset("complete", P, P.twin), P)


# ---------------------------------------------------------------------------------------------------
# The performance summary
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


def summary_plans(P: Profile, source: str) -> list[PresetPlan]:
    """The summary's four presets as ``P`` allows them on ``source``."""
    return [adapt_preset(g.preset, P, source) for g in GUIDE_SUMMARY]


def summary_scenarios(P: Profile) -> list[Scenario]:
    """Each summary preset timed on the profile's twin at ``P.size``, and on each of ``P.summary_twins``
    at its own (native) size."""
    out = [preset_scenario(plan, P) for plan in summary_plans(P, P.twin)]
    for twin in P.summary_twins:
        out += [preset_scenario(plan, P, size=None) for plan in summary_plans(P, twin)]
    return out


def quality_scenarios(P: Profile) -> list[Scenario]:
    """Prompt accuracy and FID of each summary preset on ``P.model``, at the preset's steps and guidance."""
    return [preset_scenario(plan, P, kind="quality") for plan in summary_plans(P, P.model)]


def comparable(record: dict | None) -> bool:
    """Whether a speed record measured the setup the guide's numbers refer to (SD 1.5, 512 px)."""
    return record is not None and all(record.get(k) == v for k, v in GUIDE_SETUP.items())


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def summary_rows(records: Sequence[dict], scores: Sequence[dict], source: str) -> list[dict]:
    """Our numbers for each row of the guide's summary, on twin ``source`` and on shapes.

    Speed is the baseline's seconds per image over the row's; memory is the peak GB allocated;
    quality is the prompt accuracy on shapes as a percentage of the baseline preset's.
    """
    speed = {r["preset"]: r for r in records if r.get("source") == source}
    quality = {s["preset"]: s for s in scores if s.get("status") == "ok"}
    base, base_q = speed.get("baseline"), quality.get("baseline")
    rows = []
    for g in GUIDE_SUMMARY:
        r, q = speed.get(g.preset), quality.get(g.preset)
        ok = r is not None and measured(r)
        base_ok = base is not None and measured(base)
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
    reasons that the records show: what could not run, the setup, the step count, offloading."""
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


def verdict_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows of the chapter's verdict, from `summary_rows`: speed and memory where the setup is the
    guide's (SD 1.5 at 512 px; else "not measurable"), quality on shapes everywhere."""
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
