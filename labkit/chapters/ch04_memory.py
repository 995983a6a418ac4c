"""Chapter 4, memory: offloading, VAE tiling and slicing, attention slicing, under simulated small GPUs.

- `tier1`, `configs`, `caps`: the configurations the chapter compares and the memory caps it runs
  them under (none where memory cannot be capped);
- `sweep_scenarios`: each configuration at the profile's size and its large size, under each cap;
  `batch_scenarios`: VAE slicing at the profile's largest batch; `published_capped`: the published
  run's capped records of the sweep;
- `attention_scores_gb`, `attention_table`: the memory of the attention matrix that classic and
  sliced attention materialise (arithmetic on the UNet, not a measurement);
- `slicing_lines`: what attention slicing costs on top of SDPA, from the records;
- `recommend`: the fastest configuration that fits, per GPU memory cap and image size;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from labkit.book import PROFILES, Profile, find, judge
from labkit.devices import GB, release_memory
from labkit.models import load_pipeline
from labkit.scenarios import Scenario, grid

CLAIMED_GB = (4.0, 6.0)
"""The guide's "4-6GB": the GPU sizes the memory recipe claims to run on."""

GUIDE = "the guide's: offload + tiling + slicing"
"""The label of the guide's recipe: model offload, VAE tiling and attention slicing together."""


def tier1(P: Profile) -> list:
    """What every configuration starts from (loaded in ``P.half_dtype``): DPM-Solver++ and SDPA."""
    return [("dpm_solver", {"steps": P.fast_steps}), "sdpa"]


def configs(P: Profile) -> dict[str, list]:
    """The configurations of the sweep: label -> optimizations, each on top of `tier1`."""
    base = tier1(P)
    return {
        "tier 1": base,
        "+ attention slicing": base + ["attention_slicing"],
        "+ VAE tiling": base + ["vae_tiling"],
        "model offload": base + ["model_cpu_offload"],
        "model offload + VAE tiling": base + ["model_cpu_offload", "vae_tiling"],
        GUIDE: base + ["model_cpu_offload", "vae_tiling", "attention_slicing"],
        "group offload (leaf, stream)": base + ["group_offload"],
        "sequential offload": base + ["sequential_cpu_offload"],
    }


def caps(P: Profile) -> list[float | None]:
    """The memory caps of the sweep in GB, smallest first, then no cap (``None``).

    The profile's cap and the guide's 4 and 6 GB; only ``None`` where the profile's device cannot be
    capped (``P.memory_cap_gb`` is None: a CPU).
    """
    if P.memory_cap_gb is None:
        return [None]
    return [*sorted({P.memory_cap_gb, *CLAIMED_GB}), None]


def _grid(P: Profile, configurations: dict[str, list], **settings) -> list[Scenario]:
    return grid(
        configurations,
        source=P.twin,
        dtype=P.half_dtype,
        steps=P.fast_steps,
        repeats=P.repeats,
        warmup=P.warmup,
        **settings,
    )


def sweep_scenarios(P: Profile) -> list[Scenario]:
    """Each configuration of `configs` at ``P.size`` and ``P.large_size``, under each of `caps`.

    A configuration that fits under a cap is not run again under a larger one (`labkit.scenarios.measure`
    copies its record, ``measured_under_gb`` naming the cap it ran under).
    """
    return _grid(P, configs(P), sizes=[P.size, P.large_size], caps=caps(P))


def batch_scenarios(P: Profile) -> list[Scenario]:
    """Tier 1 with and without VAE slicing at the profile's largest batch, at ``P.size``."""
    base = tier1(P)
    return _grid(
        P,
        {"tier 1": base, "+ VAE slicing": base + ["vae_slicing"]},
        sizes=[P.size],
        batches=[P.batch_sizes[-1]],
    )


def published_capped(published: Sequence[dict]) -> list[dict]:
    """The published run's records of the sweep under a memory cap, labelled as the sweep names them.

    Whatever profile the published run used: its records are found by the keys of `sweep_scenarios`
    under every named profile.
    """
    wanted = {
        s.key: s.label
        for profile in PROFILES.values()
        for s in sweep_scenarios(profile)
        if s.memory_cap_gb is not None
    }
    return [{**r, "label": wanted[r["key"]]} for r in published if r.get("key") in wanted]


# ---------------------------------------------------------------------------------------------------
# The attention matrix
# ---------------------------------------------------------------------------------------------------


def attention_scores_gb(
    unet,
    size: int,
    batch: int = 1,
    *,
    slice_size: int | str | None = None,
    vae_scale_factor: int = 8,
    guidance: bool = True,
) -> dict:
    """Memory of the attention matrices that classic or sliced attention materialises.

    Classic attention (``AttnProcessor``) and attention slicing (``SlicedAttnProcessor``) compute
    ``softmax(Q K^T)`` as a real tensor: for the UNet's first self-attention (the one at the highest
    resolution) that is ``tokens x tokens`` numbers per head and per image, and the scores and their
    softmax exist at the same moment. Slicing computes ``slice_size`` (batch x head) rows at a time
    (``"auto"``: half the heads). PyTorch SDPA's fused kernels (flash, memory-efficient) never hold
    the matrix. Returns ``tokens``, ``heads``, ``rows`` (images x CFG x heads), ``slice_rows`` and
    ``full_gb`` / ``sliced_gb``: the two matrices' size in GB, all rows at once or one slice.
    """
    from diffusers.models.attention_processor import Attention

    level, first = None, None
    for index, block in enumerate(unet.down_blocks):
        first = next(
            (m for m in block.modules() if isinstance(m, Attention) and not m.is_cross_attention), None
        )
        if first is not None:
            level = index
            break
    if first is None:
        raise ValueError("this UNet has no self-attention in its down blocks")
    side = size // vae_scale_factor // 2**level
    tokens = side * side
    heads = first.heads
    rows = batch * (2 if guidance else 1) * heads
    if slice_size == "auto":
        slice_size = max(1, heads // 2)
    slice_rows = min(rows, slice_size) if slice_size else rows
    element = torch.finfo(unet.dtype).bits // 8
    return {
        "tokens": tokens,
        "heads": heads,
        "rows": rows,
        "slice_rows": slice_rows,
        "full_gb": 2 * rows * tokens**2 * element / GB,
        "sliced_gb": 2 * slice_rows * tokens**2 * element / GB,
    }


def attention_table(P: Profile, sizes: Sequence[int] | None = None):
    """`attention_scores_gb` of the profile's twin at ``sizes`` (its size and large size), auto slices.

    Loads the twin in ``P.half_dtype`` on the profile's device for its architecture and dtype, and frees it.
    """
    import pandas as pd

    pipe = load_pipeline(P.twin, device=P.device, dtype=P.half_dtype)
    rows = []
    for size in sizes or (P.size, P.large_size):
        rows.append({**attention_scores_gb(pipe.unet, size, slice_size="auto"), "size": size})
    del pipe
    release_memory(P.device)
    return (
        pd.DataFrame(rows)
        .set_index("size")
        .rename(
            columns={
                "full_gb": "GB, classic (all heads)",
                "sliced_gb": "GB, sliced (one slice)",
                "rows": "images x CFG x heads",
                "slice_rows": "rows per slice",
            }
        )
    )


def _pick(records: Sequence[dict], label: str, size: int, cap: float | None = None) -> dict | None:
    return find(records, label=label, size=size, memory_cap_gb=cap)


def slicing_lines(records: Sequence[dict], sizes: Sequence[int]) -> list[str]:
    """What attention slicing costs against tier 1, uncapped, at each size: time and peak memory ratios."""
    lines = []
    for size in sizes:
        base, sliced = _pick(records, "tier 1", size), _pick(records, "+ attention slicing", size)
        if base["status"] != "ok" or sliced["status"] != "ok":
            lines.append(f"{size} px: tier 1 {base['status']}, with slicing {sliced['status']}")
            continue
        ratio = sliced["s_per_image"] / base["s_per_image"]
        line = f"{size} px: attention slicing takes {ratio:.2f}x the time"
        if base["peak_allocated_gb"] is not None:
            line += f", {sliced['peak_allocated_gb'] / base['peak_allocated_gb']:.2f}x the peak memory"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------------
# The recommendation and the verdict
# ---------------------------------------------------------------------------------------------------


def recommend(records: Sequence[dict], device_gb: float | None = None):
    """The fastest configuration that ran, per GPU memory cap and image size (the chapter's closing table).

    For each size and cap of the sweep's records, the ``ok`` record with the lowest seconds per image,
    and how many configurations fitted. ``device_gb`` names the uncapped device's memory.
    """
    import pandas as pd

    groups: dict = {}
    for r in records:
        groups.setdefault((r.get("memory_cap_gb"), r.get("size")), []).append(r)
    rows = []
    order = sorted(groups, key=lambda k: (float("inf") if k[0] is None else k[0], k[1] or 0))
    for cap, size in order:
        ran = [r for r in groups[(cap, size)] if r["status"] == "ok"]
        best = min(ran, key=lambda r: r["s_per_image"]) if ran else None
        if cap is not None:
            gpu = f"{cap:g} GB"
        else:
            gpu = "no cap" + (f" ({device_gb:.0f} GB)" if device_gb else "")
        rows.append(
            {
                "GPU memory": gpu,
                "size": size,
                "recommended": best["label"] if best else "nothing fits",
                "s / image": best["s_per_image"] if best else None,
                "peak GB": best.get("peak_allocated_gb") if best else None,
                "configurations that fit": f"{len(ran)} of {len(groups[(cap, size)])}",
            }
        )
    return pd.DataFrame(rows)


def _fits(record: dict | None, cap: float) -> str:
    if record is None or record["status"] == "unavailable":
        return "not measurable on this device"
    if record["status"] != "ok":
        return f"does not hold: {record['status']} under {cap:g} GB"
    return judge(record["peak_reserved_gb"], 0, cap, tolerance=0)


def _state(record: dict | None) -> str:
    if record is None or record["status"] == "unavailable":
        return "no memory cap on this device"
    if record["status"] != "ok":
        return record["status"]
    return f"fits ({record['s_per_image']:.3g} s/image, peak {record['peak_allocated_gb']:.2f} GB)"


def verdict_rows(records: Sequence[dict], P: Profile) -> list[dict]:
    """The rows of the chapter's verdict, from the records of `sweep_scenarios`.

    Whether the guide's recipe fits under 4 and 6 GB at both sizes (beside tier 1 alone under the same
    cap), and whether attention slicing saves memory on top of SDPA, uncapped.
    """
    rows = []
    for size in (P.size, P.large_size):
        for cap in CLAIMED_GB:
            guide, plain = _pick(records, GUIDE, size, cap), _pick(records, "tier 1", size, cap)
            rows.append(
                {
                    "claim": f"runs on a {cap:g} GB GPU, {size} px (the guide's three switches)",
                    "claimed": "fits",
                    "measured": f"guide's: {_state(guide)}; tier 1 alone: {_state(plain)}",
                    "verdict": _fits(guide, cap),
                }
            )
    for size in (P.size, P.large_size):
        base, sliced = _pick(records, "tier 1", size), _pick(records, "+ attention slicing", size)
        if base["status"] == "ok" and sliced["status"] == "ok" and base["peak_allocated_gb"]:
            saving = 100 * (1 - sliced["peak_allocated_gb"] / base["peak_allocated_gb"])
            slower = sliced["s_per_image"] / base["s_per_image"]
            measured = f"{saving:.0f}% less peak memory, {slower:.2f}x the time"
            verdict = judge(saving, 5, 100, tolerance=0)
        elif base["status"] == "ok" and sliced["status"] == "ok":
            measured, verdict = "no GPU memory on this device", "not measurable on this device"
        else:
            measured = f"tier 1: {base['status']}, with slicing: {sliced['status']}"
            verdict = "does not hold" if base["status"] == "ok" else "not measured"
        rows.append(
            {
                "claim": f"attention slicing saves memory on top of SDPA, {size} px",
                "claimed": "less peak memory",
                "measured": measured,
                "verdict": verdict,
            }
        )
    return rows
