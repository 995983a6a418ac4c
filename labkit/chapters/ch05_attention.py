"""Chapter 5, attention: classic attention, SDPA and its pinned kernels, xFormers, and where the time goes.

- `configs`: the attention configurations (classic, SDPA, SDPA pinned to each backend, xFormers);
- `scenarios`: each at the profile's size and large size, with a time breakdown (attention's share
  of the UNet time, from the profiler);
- `attention_speedup`, `speedup_lines`: the UNet speed-up that Amdahl's law predicts from SDPA's
  attention speed-up and attention's share, against the measured one;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

from collections.abc import Sequence

from labkit.book import Profile, find, judge
from labkit.scenarios import Scenario, grid

BASELINE = "classic attention"
"""The configuration every other one is compared with."""


def configs(P: Profile) -> dict[str, list]:
    """Label -> optimizations: classic attention, SDPA, SDPA pinned to one backend, xFormers.

    Each starts from DPM-Solver++ at the profile's fast steps (loaded in ``P.half_dtype``). A pinned
    backend pins the UNet's attention only: the VAE's 512-wide head is beyond the flash kernel.
    """
    dpm = ("dpm_solver", {"steps": P.fast_steps})
    return {
        BASELINE: [dpm, "classic_attention"],
        "SDPA": [dpm, "sdpa"],
        "SDPA flash": [dpm, ("sdpa", {"backend": "flash"})],
        "SDPA memory-efficient": [dpm, ("sdpa", {"backend": "efficient"})],
        "SDPA math": [dpm, ("sdpa", {"backend": "math"})],
        "xFormers": [dpm, "xformers"],
    }


def scenarios(P: Profile) -> list[Scenario]:
    """Each of `configs` at ``P.size`` and ``P.large_size``, with the time breakdown (``breakdown``)."""
    return grid(
        configs(P),
        source=P.twin,
        dtype=P.half_dtype,
        sizes=[P.size, P.large_size],
        steps=P.fast_steps,
        repeats=P.repeats,
        warmup=P.warmup,
        breakdown=True,
    )


def _pick(records: Sequence[dict], label: str, size: int) -> dict:
    record = find(records, label=label, size=size)
    if record is None:
        raise ValueError(f"no record of {label!r} at {size} px")
    return record


def attention_speedup(classic: dict, sdpa: dict) -> dict:
    """Amdahl's law on two measured records: attention's share of the UNet time with classic
    attention, SDPA's attention speed-up ``k``, the UNet speed-up they predict
    (``1 / (1 - share + share / k)``) and the measured UNet speed-up."""
    share = classic["attention_share"]
    k = classic["attention_s"] / sdpa["attention_s"]
    return {
        "share": share,
        "attention_speedup": k,
        "predicted": 1 / (1 - share + share / k),
        "measured": classic["unet_s"] / sdpa["unet_s"],
    }


def speedup_lines(records: Sequence[dict], sizes: Sequence[int]) -> list[str]:
    """`attention_speedup` of SDPA against classic attention at each size, as sentences."""
    lines = []
    for size in sizes:
        classic, sdpa = _pick(records, BASELINE, size), _pick(records, "SDPA", size)
        if classic["status"] != "ok" or sdpa["status"] != "ok":
            lines.append(f"{size} px: classic {classic['status']}, SDPA {sdpa['status']}")
            continue
        a = attention_speedup(classic, sdpa)
        lines.append(
            f"{size} px: attention is {a['share']:.0%} of UNet time with classic attention; SDPA makes it "
            f"{a['attention_speedup']:.2f}x faster, so the UNet should be {a['predicted']:.2f}x faster: "
            f"measured {a['measured']:.2f}x"
        )
    return lines


def claim_rows(records: Sequence[dict], name: str, label: str, size: int) -> list[dict]:
    """The guide's "2-4x faster attention, 40-60% memory reduction" for ``label`` (shown as ``name``)
    against classic attention at ``size``: attention time from the profiler, memory from the peak of
    the whole generation."""
    base, new = _pick(records, BASELINE, size), _pick(records, label, size)
    speed_claim = {"claim": f"{name}: 2-4x faster attention, {size} px", "claimed": "2-4x"}
    memory_claim = {"claim": f"{name}: 40-60% less memory, {size} px", "claimed": "40-60%"}
    if new["status"] == "unavailable":
        why = f"{name} cannot run here: {new['reason']}"
        return [
            speed_claim | {"measured": why, "verdict": "not measured"},
            memory_claim | {"measured": why, "verdict": "not measured"},
        ]
    if base["status"] != "ok" or new["status"] != "ok":
        ran = f"classic: {base['status']}, {name}: {new['status']}"
        return [speed_claim | {"measured": ran, "verdict": "not measured"}]
    speed = base["attention_s"] / new["attention_s"]
    whole = base["s_per_image"] / new["s_per_image"]
    rows = [
        speed_claim | {"measured": f"{speed:.2f}x (whole image: {whole:.2f}x)", "verdict": judge(speed, 2, 4)}
    ]
    if base["peak_allocated_gb"] is None:
        memory, verdict = "no GPU memory on this device", "not measurable on this device"
    else:
        saving = 100 * (1 - new["peak_allocated_gb"] / base["peak_allocated_gb"])
        memory = f"{saving:.0f}% ({base['peak_allocated_gb']:.2f} -> {new['peak_allocated_gb']:.2f} GB)"
        verdict = judge(saving, 40, 60)
    rows.append(memory_claim | {"measured": memory, "verdict": verdict})
    return rows


def verdict_rows(records: Sequence[dict], P: Profile) -> list[dict]:
    """The rows of the chapter's verdict, from the records of `scenarios`: the guide's claim for
    xFormers and, since SDPA took its place in diffusers, for PyTorch SDPA, at both sizes."""
    rows = []
    for name, label in (("xFormers", "xFormers"), ("PyTorch SDPA", "SDPA")):
        for size in (P.size, P.large_size):
            rows += claim_rows(records, name, label, size)
    return rows
