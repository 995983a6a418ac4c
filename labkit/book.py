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
from labkit.records import Store

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
