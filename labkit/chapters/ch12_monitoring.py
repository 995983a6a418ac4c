"""Chapter 12, monitoring: the guide's monitoring snippet as written, the same done properly, and a
regression check with ``labkit compare`` (`labkit.compare`).

- `guide_monitor`: the guide's "Monitoring and Validation" snippet as written (one call timed with
  ``time.time()``, memory read after it, an Inception FID); `guide_scenario` measures it as a kind of
  its own, ``guide_monitor``, on a freshly built pipeline;
- `monitor_scenarios`: the proper measurement of the same setup on ``shapes``, a ``generate`` scenario
  (synchronised timing, warm-up apart, median of repeats, peak memory) and a ``quality`` one (prompt
  accuracy and FID); `monitor_record` joins their records into the one record a regression check reads;
- `slowed_scenarios`: the same setup with Heun's sampler swapped in (kind ``with_scheduler``), a change
  that makes every image slower;
- `monitor_table`: the snippet beside the proper measurement; `verdict_rows`: the chapter's verdict.
"""

from __future__ import annotations

import time

from labkit.book import Profile, judge
from labkit.scenarios import MEASURERS, Scenario, measurer

LABEL = "production"
"""The label of the monitored setup: the name `labkit.compare` matches two runs' records by."""

SLOW_SCHEDULER = "HeunDiscreteScheduler"
"""The sampler of the deliberately slowed run: two UNet evaluations per step but the first."""


def guide_monitor(pipe, prompt: str = "test", **call_kwargs) -> dict:
    """Run the guide's monitoring snippet as written and return what it measured.

    One ``pipe(prompt=...)`` timed with ``time.time()`` (no CUDA synchronisation, the first call with
    its warm-up), then ``torch.cuda.memory_allocated()`` and ``memory_reserved()`` read *after* the
    call (current, not peak; 0 without a GPU), then ``FrechetInceptionDistance(feature=2048)``, whose
    failure (torch-fidelity missing, or its weights not downloadable offline) is returned, not raised.
    ``call_kwargs`` (e.g. ``num_inference_steps``) are passed to the call: the chapter keeps the
    profile's step count.
    """
    import torch

    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    pipe(prompt=prompt, **call_kwargs).images[0]
    elapsed = time.time() - start
    out = {
        "generation_s": elapsed,
        "memory_allocated_gb": torch.cuda.memory_allocated() / 1e9,
        "memory_reserved_gb": torch.cuda.memory_reserved() / 1e9,
        "fid_error": None,
    }
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        FrechetInceptionDistance(feature=2048)
    except Exception as error:  # the point: report why the guide's FID does not run here
        out["fid_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return out


@measurer("guide_monitor")
def _guide_monitor(scenario: Scenario, pipe, device) -> dict:
    """The guide's snippet (`guide_monitor`) at the scenario's step count, on the pipeline as built: its
    first call, warm-up included, is what the snippet times."""
    return guide_monitor(pipe, num_inference_steps=scenario.steps)


@measurer("with_scheduler", device_independent=lambda s: s.options.get("measure") == "quality")
def _with_scheduler(scenario: Scenario, pipe, device) -> dict:
    """A ``generate`` or ``quality`` measurement (``options["measure"]``) with the pipeline's scheduler
    replaced by the diffusers class ``options["scheduler"]``, built from the current scheduler's config:
    a sampler that no labkit optimization provides. The pipeline gets its scheduler back afterwards."""
    import diffusers

    kept = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scenario.options["scheduler"]).from_config(kept.config)
    try:
        return MEASURERS[scenario.options["measure"]].fn(scenario, pipe, device)
    finally:
        pipe.scheduler = kept


def _sampler(P: Profile) -> tuple:
    return (("dpm_solver", {"steps": P.fast_steps}),)


def guide_scenario(P: Profile) -> Scenario:
    """The guide's snippet on ``P.model`` with DPM-Solver++ at ``P.fast_steps``: one call, no warm-up.

    Measure it on its own (`labkit.measure` builds a fresh pipeline per call): a pipeline that has
    already generated has no warm-up left for the snippet to count.
    """
    return Scenario(
        kind="guide_monitor",
        source=P.model,
        optimizations=_sampler(P),
        steps=P.fast_steps,
        repeats=1,
        warmup=0,
        label="the guide's snippet",
    )


def monitor_scenarios(P: Profile) -> list[Scenario]:
    """The proper measurement of the same setup: ``[generate, quality]``, both labelled `LABEL`.

    Time and memory from `labkit.benchmark` (``P.warmup`` warm-up calls apart, ``P.repeats`` timed
    calls between CUDA synchronisations, peak allocated and reserved memory); prompt accuracy and FID
    (our features) on ``P.quality_images`` held-out prompts, at the same step count.
    """
    timing = Scenario(
        kind="generate",
        source=P.model,
        optimizations=_sampler(P),
        steps=P.fast_steps,
        repeats=P.repeats,
        warmup=P.warmup,
        label=LABEL,
    )
    scores = Scenario(
        kind="quality",
        source=P.model,
        optimizations=_sampler(P),
        steps=P.fast_steps,
        n=P.quality_images,
        label=LABEL,
    )
    return [timing, scores]


def slowed_scenarios(P: Profile) -> list[Scenario]:
    """`monitor_scenarios` with Heun's sampler (`SLOW_SCHEDULER`) instead of DPM-Solver++, same steps."""
    return [
        s.but(kind="with_scheduler", options={"scheduler": SLOW_SCHEDULER, "measure": s.kind})
        for s in monitor_scenarios(P)
    ]


def monitor_record(timing: dict, scores: dict) -> dict:
    """One record of the monitored setup: the ``generate`` record, with the prompt accuracy, FID and
    number of images (``quality_images``) of the ``quality`` record when both measured."""
    record = dict(timing)
    if timing.get("status") == "ok" and scores.get("status") == "ok":
        record |= {
            "prompt_accuracy": scores["prompt_accuracy"],
            "fid": scores["fid"],
            "quality_images": scores["n"],
        }
    return record


def _gb(value: float | None) -> str:
    return "not measurable on this device" if value is None else f"{value:.3f} GB"


def monitor_table(naive: dict, proper: dict):
    """The guide's snippet (a `guide_scenario` record) beside the proper measurement (`monitor_record`),
    quantity by quantity."""
    import pandas as pd

    cuda = proper.get("peak_allocated_gb") is not None
    spread = f"{proper['s_per_image_min']:.3f}-{proper['s_per_image_max']:.3f} s"
    warmup = "no warm-up" if proper.get("warmup_s") is None else f"warm-up {proper['warmup_s']:.3f} s apart"
    rows = [
        ("generation time", f"{naive['generation_s']:.3f} s (one call, warm-up included)",
         f"{proper['s_per_image']:.3f} s (median of {proper['repeats']}, {spread}; {warmup})"),
        ("memory", f"allocated after the call: {naive['memory_allocated_gb']:.3f} GB"
         + ("" if cuda else " (no GPU: always 0)"),
         f"peak allocated: {_gb(proper.get('peak_allocated_gb'))}"),
        ("memory held by the allocator", f"reserved after the call: {naive['memory_reserved_gb']:.3f} GB",
         f"peak reserved: {_gb(proper.get('peak_reserved_gb'))}"),
        ("quality", naive["fid_error"] or "FID object created (nothing compared yet)",
         f"prompt accuracy {proper['prompt_accuracy']:.3f}, FID (our features) {proper['fid']:.1f}, "
         f"{proper['quality_images']} images" if "fid" in proper else "not measured"),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["quantity", "the guide's snippet", "measured properly"])


def verdict_rows(naive: dict, proper: dict, self_code: int, slowed_code: int) -> list[dict]:
    """The rows of the chapter's verdict: what the guide's snippet measures (``naive``, against
    ``proper``), and the exit codes of ``labkit compare`` on a run against itself and on the slowed run."""
    ratio = naive["generation_s"] / proper["s_per_image"]
    peak = proper.get("peak_allocated_gb")
    if peak:
        memory = f"{naive['memory_allocated_gb']:.2f} GB after vs {peak:.2f} GB peak"
        memory_verdict = judge(naive["memory_allocated_gb"] / peak, 1.0)
    else:
        memory, memory_verdict = "0 (no GPU)", "not measurable on this device"
    return [
        {
            "claim": "time.time() around one call gives the generation time",
            "claimed": "the steady-state time",
            "measured": f"{ratio:.2f}x the median ({naive['generation_s']:.3f} s vs "
            f"{proper['s_per_image']:.3f} s)",
            "verdict": judge(ratio, 1.0),
        },
        {
            "claim": "torch.cuda.memory_allocated() after the call: the memory it needs",
            "claimed": "the peak",
            "measured": memory,
            "verdict": memory_verdict,
        },
        {
            "claim": "FrechetInceptionDistance(feature=2048) validates quality",
            "claimed": "a FID against the baseline",
            "measured": (naive["fid_error"] or "runs, but compares nothing")[:90],
            "verdict": "does not run here" if naive["fid_error"] else "runs",
        },
        {
            "claim": "labkit compare: a run against itself",
            "claimed": "passes (exit 0)",
            "measured": f"exit {self_code}",
            "verdict": "holds" if self_code == 0 else "does not hold",
        },
        {
            "claim": "labkit compare: a deliberately slowed run",
            "claimed": "fails (exit 1)",
            "measured": f"exit {slowed_code}",
            "verdict": "holds" if slowed_code == 1 else "does not hold",
        },
    ]
