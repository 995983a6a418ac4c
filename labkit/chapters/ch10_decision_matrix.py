"""Chapter 10, the decision matrix: the guide's four use cases as presets, against its "Expected" lines.

The presets ``latency``, ``quality``, ``memory`` and ``throughput`` run as the profile allows
(`labkit.book.adapt_preset`: step counts scaled, fp16 as the profile's reduced precision, the steps that
cannot run here dropped with their reason and listed in each record's ``unavailable``).

- `USE_CASES`: the guide's four use cases, verbatim, each with the preset that implements it;
- `plans`: the four presets adapted to the profile, on one source;
- `speed_scenarios`: each preset timed on the twin (the memory preset under the guide's 4 and 6 GB caps
  where the profile caps memory, the throughput preset at every batch of ``P.batch_sizes``);
- `quality_scenarios`: each preset scored on ``shapes``;
- `best_throughput`, `matrix_table`: the matrix, read from the records;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from labkit.book import PresetPlan, Profile, adapt_preset, judge, preset_scenario
from labkit.measurement import measured
from labkit.scenarios import Scenario

GUIDE_SETUP = {"source": "twin:sd15", "size": 512}
"""The setup the guide's absolute numbers (seconds per image) refer to: SD 1.5 at 512x512 px."""

NOT_MEASURABLE = "not measurable on this device"


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


def plans(P: Profile, source: str) -> list[PresetPlan]:
    """The four use cases' presets as ``P`` allows them on ``source``."""
    return [adapt_preset(name, P, source) for name in USE_CASES]


def memory_caps(P: Profile) -> list[float | None]:
    """The caps the memory preset runs under: the guide's 4 and 6 GB on a profile that caps GPU memory,
    else none (a CPU has no GPU memory to cap)."""
    if P.memory_cap_gb is None or not str(P.device).startswith("cuda"):
        return [None]
    return list(MEMORY_CLAIM_GB)


def speed_scenarios(P: Profile) -> list[Scenario]:
    """Each preset timed on the twin: the memory preset under `memory_caps` (from the smallest up: a
    setup that fitted under a cap is not run again under a larger one), the throughput preset at every
    batch of ``P.batch_sizes``, the other two at their own batch."""
    latency, quality, memory, throughput = plans(P, P.twin)
    out = [preset_scenario(latency, P), preset_scenario(quality, P)]
    out += [preset_scenario(memory, P, memory_cap_gb=cap) for cap in memory_caps(P)]
    out += [preset_scenario(throughput, P, batch=batch) for batch in P.batch_sizes]
    return out


def quality_scenarios(P: Profile) -> list[Scenario]:
    """Prompt accuracy and FID of each preset on ``P.model``, at the preset's steps and guidance."""
    return [preset_scenario(plan, P, kind="quality") for plan in plans(P, P.model)]


def _find(records: Sequence[dict], preset: str, **match) -> dict | None:
    found = [r for r in records if r.get("preset") == preset and all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def best_throughput(records: Sequence[dict], preset: str = "throughput") -> dict | None:
    """The measured record of ``preset`` with the most images per second (the batch sweep's best)."""
    ok = [r for r in records if r.get("preset") == preset and measured(r)]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def comparable(record: dict | None) -> bool:
    """Whether a speed record measured the setup the guide's seconds refer to (SD 1.5, 512 px)."""
    return record is not None and all(record.get(k) == v for k, v in GUIDE_SETUP.items())


def _setup(record: dict) -> str:
    return f"{record.get('source')} at {record.get('size')} px"


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def matrix_table(records: Sequence[dict], scores: Sequence[dict]):
    """The decision matrix: the four use cases side by side, as measured.

    ``records`` are the records of `speed_scenarios` (the throughput preset's best batch is shown),
    ``scores`` those of `quality_scenarios`.
    """
    import pandas as pd

    rows = []
    for name, case in USE_CASES.items():
        r = best_throughput(records) if name == "throughput" else _find(records, name, batch=1)
        r = r or _find(records, name) or {}
        q = _find(scores, name) or {}
        ok = measured(r) if r else False
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


def verdict_rows(records: Sequence[dict], scores: Sequence[dict]) -> list[dict]:
    """The rows of the chapter's verdict: the guide's four "Expected" lines, computed from the records of
    `speed_scenarios` (``records``) and `quality_scenarios` (``scores``) with `labkit.book.judge`."""
    rows = []
    latency = _find(records, "latency", batch=1)
    measured_text = _fmt(latency and latency.get("s_per_image"), ".3g", " s/image")
    if latency and measured(latency) and comparable(latency):
        verdict = judge(latency["s_per_image"], 0, LATENCY_CLAIM_S, tolerance=0)
    else:
        verdict = NOT_MEASURABLE
        if latency:
            measured_text += f" ({_setup(latency)}, not SD 1.5 at 512 px)"
    rows.append({"claim": "latency: " + USE_CASES["latency"].expected, "claimed": "< 1 s",
                 "measured": measured_text, "verdict": verdict})  # fmt: skip

    good = _find(records, "quality", batch=1)
    measured_text = _fmt(good and good.get("s_per_image"), ".3g", " s/image")
    if good and measured(good) and comparable(good):
        verdict = judge(good["s_per_image"], QUALITY_CLAIM_S, tolerance=0.5)
    else:
        verdict = NOT_MEASURABLE
        if good:
            measured_text += f" ({_setup(good)}, not SD 1.5 at 512 px)"
    rows.append({"claim": "quality: ~5 seconds per image", "claimed": "about 5 s",
                 "measured": measured_text, "verdict": verdict})  # fmt: skip

    accuracy = {s["preset"]: s.get("prompt_accuracy") for s in scores if s.get("status") == "ok"}
    if accuracy.get("quality") is not None and len(accuracy) > 1:
        best = max(accuracy.values())
        others = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items() if k != "quality")
        measured_text = f"quality {accuracy['quality']:.3f}; {others}"
        verdict = "holds" if accuracy["quality"] >= best else "does not hold"
    else:
        measured_text, verdict = "no shapes scores", "not measured"
    rows.append({"claim": "quality: best quality (prompt accuracy on shapes)",
                 "claimed": "highest of the four", "measured": measured_text, "verdict": verdict})  # fmt: skip

    memory = [r for r in records if r.get("preset") == "memory"]
    capped = [r for r in memory if r.get("memory_cap_gb") is not None]
    fitted = [r for r in capped if r["status"] == "ok"]
    if fitted:
        r = fitted[0]
        measured_text = (f"fits under {r['memory_cap_gb']:g} GB: peak {r['peak_allocated_gb']:.2f} GB "
                         f"(reserved {r['peak_reserved_gb']:.2f}), {r['s_per_image']:.3g} s/image")  # fmt: skip
        verdict = judge(r["peak_reserved_gb"], 0, max(MEMORY_CLAIM_GB), tolerance=0)
    elif capped:
        measured_text = "; ".join(f"{r['status']} under {r['memory_cap_gb']:g} GB" for r in capped)
        verdict = "does not hold"
    else:
        measured_text, verdict = "no GPU memory cap on this device", NOT_MEASURABLE
    rows.append({"claim": "memory: runs on a 4-6 GB GPU", "claimed": "fits under 4-6 GB",
                 "measured": measured_text, "verdict": verdict})  # fmt: skip

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
        measured_text = f"{best['images_per_s']:.3g} images/s at batch {best['batch']}; batch 1 of {others}"
        verdict = "holds" if best["images_per_s"] >= max(singles.values()) else "does not hold"
    else:
        measured_text, verdict = "no throughput records", "not measured"
    rows.append({"claim": "throughput: maximum images/second", "claimed": "most images/s of the four",
                 "measured": measured_text, "verdict": verdict})  # fmt: skip
    return rows
