"""The book helpers: hardware profiles, the start of a chapter, tables of records, verdict boxes.

Everything a chapter shows goes through here, so every page reads the same way:

- `Profile` and `get_profile`: the sizes a chapter runs with on one kind of machine (``ci``: a CPU in
  seconds; ``gpu``: a data-centre GPU at real scale); `start_chapter` resolves it and prints the line
  that names the device every number of the page comes from;
- `records_table` and `status_table`: records as tables, with speed-ups against a baseline and the
  reason of every row without numbers;
- `judge`, `verdict`: a claim against a measurement, and the chapter's verdict box;
- `published_records` and `beside_published`: the published run's records beside the reader's own.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit._version import __version__
from labkit.devices import device_name, resolve_device
from labkit.measurement import measured
from labkit.optimizations import OPTIMIZATIONS, PRESETS, Change, step_problem
from labkit.optimizations.registry import SAMPLER
from labkit.records import Store
from labkit.scenarios import Scenario

# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Sizes and settings a chapter runs with on one kind of machine.

    Chapters read every size from the profile, never from literals, so the same chapter runs in
    seconds on a CPU (``ci``) and at real scale on a data-centre GPU (``gpu``).
    """

    name: str
    """Profile name: ``ci``, ``gpu`` or ``gpu-small``."""
    device: str
    """Torch device the chapters run on: ``cpu`` or ``cuda`` (``cuda:1``...)."""
    twin: str
    """Source for speed, memory and FLOPs: real architecture, random weights (images are noise)."""
    model: str = "shapes"
    """Source for quality numbers: our own trained tiny model."""
    dtype: str = "float32"
    """Precision of the baseline (diffusers loads at full precision)."""
    half_dtype: str = "float16"
    """Reduced precision the chapters try (``float16`` on CUDA, ``bfloat16`` on the CPU)."""
    size: int = 512
    """Image side in pixels for the twin."""
    steps: int = 50
    """Denoising steps of the baseline sampler (PNDM 50 in the guide)."""
    fast_steps: int = 20
    """Denoising steps of the fast samplers (DPM-Solver++ 20 in the guide)."""
    repeats: int = 3
    """Timed repeats per measurement (median and spread are reported)."""
    warmup: int = 1
    """Untimed warm-up calls before the repeats."""
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    """Batch sizes for throughput sweeps."""
    large_size: int = 1024
    """Image side for the memory chapter's large-image runs."""
    memory_cap_gb: float | None = 4.0
    """Simulated small GPU for the memory chapter (``None`` where memory cannot be capped)."""
    compile: bool = True
    """Whether chapters run ``torch.compile`` (minutes on a CPU, so off in ``ci``)."""
    quality_images: int = 256
    """Images per configuration for quality metrics on ``shapes``."""
    sampler_steps: tuple[int, ...] = (5, 10, 15, 20, 30, 50, 100)
    """Step counts of the samplers chapter's quality sweep on ``shapes`` (quality against steps)."""
    ddpm_steps: int = 1000
    """Steps of the slow reference sampler, DDPM (all of the model's 1000 training steps on a GPU)."""
    summary_twins: tuple[str, ...] = ()
    """Larger twins the performance summary (chapter 11) also measures, beside ``twin``."""
    description: str = ""
    """One line for people: what this profile is for."""

    def as_dict(self) -> dict[str, Any]:
        """The profile as a JSON-able dict."""
        d = dataclasses.asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["summary_twins"] = list(self.summary_twins)
        d["sampler_steps"] = list(self.sampler_steps)
        return d


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        device="cpu",
        twin="twin:tiny",
        half_dtype="bfloat16",
        size=64,
        steps=4,
        fast_steps=2,
        repeats=2,
        warmup=1,
        batch_sizes=(1, 2),
        large_size=128,
        memory_cap_gb=None,
        compile=False,
        quality_images=8,
        sampler_steps=(2, 4),
        ddpm_steps=8,
        summary_twins=(),
        description="CPU, tiny twin, tiny sizes: every chapter in seconds (what CI runs)",
    ),
    "gpu": Profile(
        name="gpu",
        device="cuda",
        twin="twin:sd15",
        size=512,
        steps=50,
        fast_steps=20,
        repeats=3,
        warmup=1,
        batch_sizes=(1, 4, 16),
        large_size=1024,
        memory_cap_gb=4.0,
        compile=True,
        quality_images=256,
        sampler_steps=(5, 10, 15, 20, 30, 50, 100),
        ddpm_steps=1000,
        summary_twins=("twin:sdxl",),
        description="data-centre GPU (>= 20 GB): SD1.5 twin at 512 px, real step counts (the book's run)",
    ),
    "gpu-small": Profile(
        name="gpu-small",
        device="cuda",
        twin="twin:sd15",
        size=512,
        steps=50,
        fast_steps=20,
        repeats=3,
        warmup=1,
        batch_sizes=(1, 2, 4),
        large_size=768,
        memory_cap_gb=4.0,
        compile=True,
        quality_images=128,
        sampler_steps=(5, 10, 15, 20, 30, 50, 100),
        ddpm_steps=1000,
        summary_twins=(),
        description="smaller GPU (< 20 GB): SD1.5 twin at 512 px, smaller batches and large images",
    ),
}
"""The named profiles; ``auto`` picks one of them from the hardware present."""

GPU_MIN_GB = 20.0
"""A CUDA device with at least this much memory gets the ``gpu`` profile, a smaller one ``gpu-small``."""


def _cuda_memory_gb(device: str = "cuda") -> float | None:
    """Total memory of a CUDA device in GB, or ``None`` when CUDA is not available."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(resolve_device(device)).total_memory / 1e9


def get_profile(name: str = "auto", *, device: str | None = None) -> Profile:
    """Return the profile ``name`` (``auto``, ``ci``, ``gpu`` or ``gpu-small``).

    ``auto`` picks ``gpu`` on a CUDA device with at least :data:`GPU_MIN_GB` GB, ``gpu-small`` on a
    smaller CUDA device, and ``ci`` otherwise. ``device`` overrides the profile's device
    (e.g. ``"cuda:1"``); with ``auto`` it is also the device whose memory is looked at.
    """
    if isinstance(name, Profile):
        return dataclasses.replace(name, device=device) if device else name
    if name == "auto":
        wants_cpu = device is not None and device.startswith("cpu")
        memory = None if wants_cpu else _cuda_memory_gb(device or "cuda")
        if memory is None:
            name = "ci"
        elif memory >= GPU_MIN_GB:
            name = "gpu"
        else:
            name = "gpu-small"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of auto, {', '.join(PROFILES)}")
    profile = PROFILES[name]
    profile = dataclasses.replace(profile, device=device) if device else profile
    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"profile {profile.name} runs on a CUDA GPU and none is visible here: use --profile ci "
            "(or auto, which picks the profile of this machine)"
        )
    return profile


# --------------------------------------------------------------------------------------------------
# The start of a chapter
# --------------------------------------------------------------------------------------------------


def start_chapter(
    profile: str | Profile = "auto", *, device: str | None = None, model: str | None = None
) -> Profile:
    """Resolve a chapter's profile from its papermill parameters and print what it runs on.

    Every chapter calls this first. The printed line names the device, so each executed page records
    where its numbers come from (the notebook checks rely on it). ``model`` overrides the profile's
    twin (e.g. ``"twin:sd21"``).
    """
    import warnings

    p = get_profile(profile, device=device)
    if model:
        p = dataclasses.replace(p, twin=model)
    # diffusers imports tqdm.auto, which warns in a notebook without ipywidgets; chapters show no bars
    warnings.filterwarnings("ignore", message="IProgress not found")
    print(
        f"labkit {__version__} · profile {p.name} · device: {p.device} ({device_name(p.device)}) · "
        f"torch {torch.__version__}"
    )
    return p


def profile_table(profile: Profile) -> Any:
    """The profile as a two-column pandas table (setting, value) for display in a chapter."""
    import pandas as pd

    rows = [(k, v) for k, v in profile.as_dict().items() if k != "description"]
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")


# --------------------------------------------------------------------------------------------------
# Records as tables
# --------------------------------------------------------------------------------------------------


def find(records: Sequence[dict], **match) -> dict | None:
    """The first record whose fields equal ``match`` (``find(rows, sampler="DDIM", steps=50)``), or None."""
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


TABLE_COLUMNS = {
    "label": "configuration",
    "status": "status",
    "s_per_image": "s / image",
    "spread": "spread (min-max)",
    "speedup": "speed-up",
    "peak_allocated_gb": "peak GB",
    "memory_ratio": "memory ratio",
    "tflop_per_image": "TFLOP / image",
    "utilisation": "utilisation",
}


def records_table(records: list[dict], baseline: str | int | None = 0):
    """A table of records with speed-up and memory ratio against ``baseline`` (a label or a row index)."""
    import pandas as pd

    if not records:
        return pd.DataFrame(columns=list(TABLE_COLUMNS.values()))
    if isinstance(baseline, str):
        matches = [r for r in records if r["label"] == baseline]
        if not matches:
            raise ValueError(f"no record labelled {baseline!r}")
        base = matches[0]
    else:
        base = records[baseline or 0]
    rows = []
    for r in records:
        ok = measured(r)
        s = r.get("s_per_image") if ok else None
        memory = r.get("peak_allocated_gb") if ok else None
        rows.append(
            {
                "label": r["label"],
                "status": r["status"],
                "s_per_image": s,
                "spread": f"{r['s_per_image_min']:.3g}-{r['s_per_image_max']:.3g}" if ok else "",
                "speedup": base.get("s_per_image") / s if ok and base.get("s_per_image") else None,
                "peak_allocated_gb": memory,
                "memory_ratio": memory / base["peak_allocated_gb"]
                if memory and base.get("peak_allocated_gb")
                else None,
                "tflop_per_image": r["flops_per_image"] / 1e12 if r.get("flops_per_image") else None,
                "utilisation": r.get("utilisation"),
            }
        )
    return pd.DataFrame(rows).rename(columns=TABLE_COLUMNS)


STATUS_COLUMNS = {
    "label": "configuration",
    "size": "size",
    "memory_cap_gb": "GPU memory cap (GB)",
    "status": "status",
    "s_per_image": "s / image",
    "speedup": "speed-up",
    "peak_allocated_gb": "peak GB",
    "peak_reserved_gb": "reserved GB",
    "note": "note",
}


def note(record: dict) -> str:
    """Why a record has no numbers (unavailable, out of memory, failed), or under which cap it ran."""
    if record["status"] == "unavailable":
        return record.get("reason", "")
    if record["status"] in ("oom", "error"):
        return record.get("error", "")
    if record.get("memory_cap_gb") != record.get("measured_under_gb"):
        return f"fits under {record['measured_under_gb']:g} GB, so under this cap too (not run again)"
    return ""


def status_table(records: list[dict], baseline: str | None = None, extra=()):
    """A table of records of any status: time, memory, and why a row has no numbers.

    ``speed-up`` is against the ``baseline`` label's record of the same size and cap (when it ran).
    ``extra`` names more record fields to show (e.g. ``"attention_share"``). Sizes and caps are shown
    only when the records hold them.
    """
    import pandas as pd

    def key(r):
        return (r.get("size"), r.get("memory_cap_gb"))

    bases = {key(r): r for r in records if r["label"] == baseline and r["status"] == "ok"}
    rows = []
    for r in records:
        ok = r["status"] in ("ok", "nan")
        base = bases.get(key(r))
        s = r.get("s_per_image") if ok else None
        row = {
            "label": r["label"],
            "size": r.get("size"),
            "memory_cap_gb": "none" if r.get("memory_cap_gb") is None else r["memory_cap_gb"],
            "status": r["status"],
            "s_per_image": s,
            "speedup": base["s_per_image"] / s if base and s else None,
            "peak_allocated_gb": r.get("peak_allocated_gb") if ok else None,
            "peak_reserved_gb": r.get("peak_reserved_gb") if ok else None,
            "note": note(r),
        }
        row |= {name: r.get(name) if ok else None for name in extra}
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*STATUS_COLUMNS, *extra])
    if not any(r.get("memory_cap_gb") is not None for r in records):
        table = table.drop(columns="memory_cap_gb")
    if baseline is None:
        table = table.drop(columns="speedup")
    return table.rename(columns=STATUS_COLUMNS)


# --------------------------------------------------------------------------------------------------
# Beside the published run
# --------------------------------------------------------------------------------------------------


def published_records(folder: str | Path | None) -> list[dict]:
    """The records of the published run (a records folder such as ``book/records``), or ``[]``."""
    if not folder or not Path(folder).is_dir():
        return []
    return Store(folder).records()


def beside_published(
    ours: Sequence[dict],
    published: Sequence[dict],
    columns: Sequence[str] = ("label", "device", "s_per_image", "peak_allocated_gb"),
    *,
    ours_name: str = "this run",
    published_name: str = "published",
) -> Any:
    """One table with this run's records and the published ones, a ``run`` column telling them apart.

    Rows keep their order; columns a record lacks are left empty.
    """
    import pandas as pd

    rows = [{"run": ours_name, **{c: r.get(c) for c in columns}} for r in ours]
    rows += [{"run": published_name, **{c: r.get(c) for c in columns}} for r in published]
    return pd.DataFrame(rows, columns=["run", *columns])


def same_setup(a: dict, b: dict) -> bool:
    """Whether two records measured the same setup (their devices may differ): the same scenario key,
    or, for records without one, the same source, size, steps, batch and dtype."""
    if a.get("key") and b.get("key"):
        return a["key"] == b["key"]
    return all(a.get(k) == b.get(k) for k in ("source", "size", "steps", "batch", "dtype"))


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------


def judge(measured: float | None, low: float, high: float | None = None, *, tolerance: float = 0.1) -> str:
    """Compare a measured number with a claimed value or range ``[low, high]``.

    Returns ``"holds"`` when the measurement lies in the range (widened by ``tolerance``, relative),
    ``"below the claim"`` or ``"above the claim"`` otherwise, and ``"not measured"`` for ``None``.
    """
    if measured is None or measured != measured:  # None or NaN
        return "not measured"
    high = low if high is None else high
    if measured < low * (1 - tolerance):
        return "below the claim"
    if measured > high * (1 + tolerance):
        return "above the claim"
    return "holds"


def fewer_is_better(verdict: str) -> str:
    """Reword a `judge` verdict for a quantity where less is better (steps, seconds)."""
    return {
        "below the claim": "holds, and better: fewer than claimed",
        "above the claim": "does not hold: more than claimed",
    }.get(verdict, verdict)


def match_margin(p: float, n: int) -> float:
    """One standard error of a proportion ``p`` measured on ``n`` images: the accuracy noise floor.

    Two prompt accuracies closer than this are "the same quality" in the chapters' verdicts.
    """
    import math

    p = min(max(p, 1 / n), 1 - 1 / n)  # an accuracy of 0 or 1 on few images is still uncertain
    return math.sqrt(p * (1 - p) / n)


@dataclass
class Verdict:
    """The verdict box of a chapter: claimed vs measured on this device, one table.

    Each row is a dict with the keys ``claim``, ``claimed``, ``measured`` and ``verdict``.
    Displays as a boxed table in the book and as plain text elsewhere.
    """

    rows: list[dict]
    device: str = ""
    title: str = "Verdict"

    COLUMNS = ("claim", "claimed", "measured", "verdict")

    def table(self) -> Any:
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(
            [{c: r.get(c, "") for c in self.COLUMNS} for r in self.rows], columns=self.COLUMNS
        )

    def _repr_html_(self) -> str:
        where = f" (measured on {html.escape(self.device)})" if self.device else ""
        return (
            '<div class="admonition important labkit-verdict">'
            f'<p class="admonition-title">{html.escape(self.title)}{where}</p>'
            f"{self.table().to_html(index=False, escape=True)}</div>"
        )

    def __repr__(self) -> str:
        where = f" (measured on {self.device})" if self.device else ""
        return f"{self.title}{where}\n{self.table().to_string(index=False)}"


def verdict(rows: Iterable[dict], *, device: str = "", title: str = "Verdict") -> Verdict:
    """Build a chapter's verdict box from rows of ``claim``, ``claimed``, ``measured``, ``verdict``."""
    return Verdict(rows=list(rows), device=device, title=title)


# --------------------------------------------------------------------------------------------------
# Presets as a profile allows (the decision matrix and the complete stack, chapters 10 and 11)
# --------------------------------------------------------------------------------------------------

GUIDE_STEPS = 50
"""The guide's reference step count: a profile's ``steps`` stands for it (`scale_steps`)."""


def scale_steps(steps: int, profile: Profile) -> int:
    """The guide's step count ``steps`` on ``profile``: ``steps * P.steps / 50`` (the identity on ``gpu``)."""
    return max(1, round(steps * profile.steps / GUIDE_STEPS))


@dataclass(frozen=True)
class PresetPlan:
    """A preset as a profile allows it on one source (`adapt_preset`): the optimizations that run, the
    call settings, what was adapted to the profile, and the steps dropped, each an ``unavailable``
    `Change` with its reason."""

    preset: str
    source: str | None
    steps: list[tuple[str, dict]]
    call: dict
    adapted: list[str]
    dropped: list[Change]

    @property
    def notes(self) -> dict:
        """What a record of the plan says about it: the preset, what was adapted, what could not run."""
        unavailable = [str(c) for c in self.dropped]
        return {"preset": self.preset, "adapted": list(self.adapted), "unavailable": unavailable}

    @property
    def steps_per_image(self) -> int | None:
        """Denoising steps: the call's, else the sampler's (None: the model's default)."""
        samplers = [o["steps"] for n, o in self.steps if OPTIMIZATIONS[n].stage == SAMPLER and "steps" in o]
        return self.call.get("steps", samplers[-1] if samplers else None)


def adapt_preset(preset: str, profile: Profile, source: str | None = None) -> PresetPlan:
    """Preset ``preset`` as ``profile`` allows it on ``source``; nothing is dropped silently.

    Step counts are scaled by ``P.steps / 50`` (`scale_steps`); fp16 becomes bf16 where that is the
    profile's reduced precision; the guide's large size and batch become ``P.large_size`` and the
    largest of ``P.batch_sizes``. A step that cannot run is dropped with its reason: ``torch_compile``
    where ``P.compile`` is off, and any step whose needs are missing here, on the profile's device or
    on ``source`` (`labkit.optimizations.step_problem`), so that a scenario asks only for what runs.
    """
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
            problem = f"profile {profile.name} has compilation off (P.compile is False: minutes here)"
        else:
            problem = step_problem(name, source=source)
            if problem is None and "cuda" in OPTIMIZATIONS[name].needs and "cuda" not in str(profile.device):
                problem = f"needs a CUDA GPU; profile {profile.name} runs on {profile.device}"
        if problem is not None:
            dropped.append(Change(name, "unavailable", problem, options))
        else:
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
    # in the order apply() runs them, as a record lists the steps that could not run
    dropped.sort(key=lambda c: OPTIMIZATIONS[c.name].stage)
    return PresetPlan(preset, source, steps, call, adapted, dropped)


def preset_scenario(
    plan: PresetPlan, profile: Profile, *, kind: str = "generate", label: str | None = None, **fields
) -> Scenario:
    """A scenario of ``plan`` on its source; its record carries ``plan.notes``.

    ``kind="generate"`` times a generation at the plan's size (else ``P.size``), steps, batch (else 1)
    and guidance, ``P.repeats`` after ``P.warmup``; ``kind="quality"`` scores ``P.quality_images``
    held-out prompts at the plan's steps and guidance, generated in chunks of its batch. ``fields``
    override the scenario's fields (``batch``, ``size``, ``memory_cap_gb``...).
    """
    steps = plan.steps_per_image
    common = {
        "kind": kind,
        "source": plan.source,
        "optimizations": tuple(plan.steps),
        "guidance": plan.call.get("guidance"),
        "label": label or plan.preset,
        "notes": plan.notes,
    }
    if kind == "quality":
        batch = plan.call.get("batch")
        common |= {
            "steps": steps or scale_steps(GUIDE_STEPS, profile),
            "n": profile.quality_images,
            "options": {} if batch is None else {"chunk": batch},
        }
    else:
        common |= {
            "steps": steps,
            "size": plan.call.get("size", profile.size),
            "batch": plan.call.get("batch", 1),
            "repeats": profile.repeats,
            "warmup": profile.warmup,
        }
    return Scenario(**(common | fields))


def plan_table(plans: Sequence[PresetPlan]) -> Any:
    """What each plan runs: its optimizations, its call settings, what was adapted or dropped."""
    import pandas as pd

    def options(values: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items())

    rows = [
        {
            "preset": plan.preset,
            "optimizations": ", ".join(n + (f"({options(o)})" if o else "") for n, o in plan.steps),
            "call": options(plan.call),
            "adapted to the profile": "; ".join(plan.adapted) or "-",
            "dropped": "; ".join(f"{c.name}: {c.what}" for c in plan.dropped) or "-",
        }
        for plan in plans
    ]
    return pd.DataFrame(rows)
