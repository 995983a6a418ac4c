"""Measurement: `benchmark` a configuration, the result record, the environment, FLOPs, memory.

The rules (DESIGN.md): warm-up excluded and reported apart (it holds the compile time); at least 3
repeats, median and spread; CUDA synchronised around every timed call; peak memory from the CUDA
allocator; FLOPs from `torch.utils.flop_counter.FlopCounterMode`; utilisation against a matmul peak
measured in the same process; an out-of-memory run is a result (``status="oom"``), not a crash; NaN
images are detected and reported. Results are JSON lines; `results_table` turns them into a table.
Explained in chapter 0 (set-up and baseline).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from labkit.models import call_settings, generate

GB = 1e9


@dataclass
class Result:
    """One benchmarked configuration: ``record`` (JSON-able) and the ``images`` of its last run."""

    record: dict
    images: np.ndarray | None = None

    def __repr__(self) -> str:
        r = self.record
        if r["status"] == "oom":
            return f"Result({r['label']!r}: out of memory)"
        return f"Result({r['label']!r}: {r['s_per_image']:.3f} s/image, status {r['status']})"


def synchronize(device: torch.device | str) -> None:
    """Wait for the GPU to finish its queued work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(
    pipe,
    *,
    prompt: str | list[str] | None = None,
    steps: int | None = None,
    size: int | None = None,
    batch: int | None = None,
    guidance: float | None = None,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    label: str | None = None,
    flops: bool = True,
) -> Result:
    """Time ``pipe`` end to end (text encoding, denoising, VAE decode) and return a `Result`.

    ``warmup`` untimed-for-the-median calls run first (their time is ``warmup_s``: with torch.compile
    it holds the compile time); then ``repeats`` timed calls, each between two CUDA synchronisations.
    Peak memory covers the timed calls. Settings left unset come from the applied preset.
    """
    if isinstance(prompt, list):  # a list of prompts is the batch
        batch = len(prompt)
    settings = call_settings(pipe, steps=steps, size=size, batch=batch, guidance=guidance)
    device = pipe._execution_device
    record = {
        "label": label or getattr(pipe, "labkit_preset", None) or "custom",
        "source": getattr(pipe, "labkit_source", None),
        "status": "ok",
        **describe(pipe),
        **{k: settings[k] for k in ("steps", "size", "batch", "guidance")},
        "repeats": repeats,
        "warmup": warmup,
        **environment(device),
    }
    kwargs = dict(
        prompt=prompt, seed=seed, **{k: settings[k] for k in ("steps", "size", "batch", "guidance")}
    )
    pipe.set_progress_bar_config(disable=True)
    try:
        warmup_times = [_timed(lambda: generate(pipe, **kwargs), device)[0] for _ in range(warmup)]
        _reset_peak_memory(device)
        times, images = [], None
        for _ in range(repeats):
            seconds, images = _timed(lambda: generate(pipe, **kwargs), device)
            times.append(seconds)
        memory = _peak_memory(device)
    except torch.OutOfMemoryError as error:
        release_memory(device)
        record |= {"status": "oom", "error": str(error).splitlines()[0]}
        return Result(record)
    per_image = [t / settings["batch"] for t in times]
    record |= {
        "s_per_image": statistics.median(per_image),
        "s_per_image_min": min(per_image),
        "s_per_image_max": max(per_image),
        "images_per_s": settings["batch"] / statistics.median(times),
        "warmup_s": sum(warmup_times) if warmup_times else None,
        "times_s": times,
        **memory,
        # the number of UNet calls (PNDM makes one more than its step count)
        "denoiser_evaluations": len(pipe.scheduler.timesteps)
        if pipe.scheduler.timesteps is not None
        else None,
        **image_check(images),
    }
    if record["nan_images"]:
        record["status"] = "nan"
    if flops:
        record |= flop_count(pipe, kwargs, record["denoiser_evaluations"])
        peak = matmul_peak_tflops(device, pipe.unet.dtype)
        record["matmul_peak_tflops"] = peak
        record["utilisation"] = record["flops_per_image"] / record["s_per_image"] / (peak * 1e12)
    return Result(record, images)


def _timed(fn, device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def describe(pipe) -> dict:
    """What a pipeline is made of and what was applied to it, for the result record."""
    applied = getattr(pipe, "labkit_applied", [])
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    return {
        "preset": getattr(pipe, "labkit_preset", None),
        "applied": [str(c) for c in applied if c.status == "applied"],
        "unavailable": [str(c) for c in applied if c.status != "applied"],
        "dtype": str(unet.dtype).removeprefix("torch."),
        "scheduler": type(pipe.scheduler).__name__,
        "attention": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }


def image_check(images: np.ndarray) -> dict:
    """Count images holding NaN (fp16 overflow) and images that are all black."""
    images = np.asarray(images, dtype=np.float32)
    flat = images.reshape(len(images), -1)
    nan = np.isnan(flat).any(axis=1)
    black = ~nan & (np.nan_to_num(flat).max(axis=1) < 0.02)
    return {"nan_images": int(nan.sum()), "black_images": int(black.sum())}


# ---------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------


def _reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device) -> dict:
    """Peak memory allocated by tensors and reserved by the caching allocator, in GB (None on a CPU)."""
    if torch.device(device).type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {
        "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
    }


def release_memory(device) -> None:
    """Free what Python and the CUDA caching allocator still hold (between configurations, after an OOM)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def memory_cap(gigabytes: float, device: str = "cuda"):
    """Pretend the GPU has only ``gigabytes`` of memory (``torch.cuda.set_per_process_memory_fraction``)."""
    if not torch.cuda.is_available():
        raise RuntimeError("memory_cap needs a CUDA GPU")
    torch.cuda.empty_cache()  # memory cached by earlier work would otherwise count against the cap
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gigabytes * GB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ---------------------------------------------------------------------------------------------------
# FLOPs and utilisation
# ---------------------------------------------------------------------------------------------------


@contextmanager
def _uncompiled(pipe):
    """Swap compiled modules for their originals (FlopCounterMode counts eager ops)."""
    unet = pipe.unet
    if hasattr(unet, "_orig_mod"):
        pipe.unet = unet._orig_mod
    try:
        yield
    finally:
        pipe.unet = unet


def flop_count(pipe, kwargs: dict, evaluations: int) -> dict:
    """FLOPs per image of a whole generation, counted with FlopCounterMode.

    Counting all steps would be slow, so it counts runs of 1 and 2 steps: their difference is the
    cost of the denoiser's evaluations added, and the total is extrapolated to ``evaluations``.
    Kernels the counter does not know (xFormers, int8 matmuls) are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    with _uncompiled(pipe):
        for steps in (1, 2):
            with FlopCounterMode(display=False) as counter:
                generate(pipe, **(kwargs | {"steps": steps}))
            counts[steps] = (counter.get_total_flops(), len(pipe.scheduler.timesteps))
    (f1, n1), (f2, n2) = counts[1], counts[2]
    per_evaluation = (f2 - f1) / (n2 - n1)
    total = f1 + (evaluations - n1) * per_evaluation
    return {
        "flops_per_image": total / kwargs["batch"],
        "denoiser_flops_per_evaluation": per_evaluation / kwargs["batch"],
    }


@functools.cache
def _matmul_peak(device_type: str, dtype: torch.dtype, tf32: bool) -> float:
    n = 8192 if device_type == "cuda" else 1024
    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10 if device_type == "cuda" else 3):
        seconds, _ = _timed(lambda: a @ b, device_type)
        best = min(best, seconds)
    return 2 * n**3 / best / 1e12


def matmul_peak_tflops(device, dtype: torch.dtype) -> float:
    """The best dense matmul rate (TFLOP/s) reached on ``device`` in ``dtype`` (and the current TF32
    setting), measured once per process."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float16
    # fp32 matmuls run on TF32 tensor cores when the tf32 optimization is on: a different peak
    return _matmul_peak(torch.device(device).type, dtype, torch.backends.cuda.matmul.allow_tf32)


# ---------------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------------


def environment(device=None) -> dict:
    """Device, driver and library versions: recorded in every result row."""
    import diffusers
    import transformers

    import labkit

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = properties.name
        details = {
            "gpu_memory_gb": properties.total_memory / GB,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        details = {}
    return {
        "device": name,
        **details,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "labkit": labkit.__version__,
        "python": platform.python_version(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@functools.cache
def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def doctor() -> dict:
    """What this machine is, and which optimizations, presets and sources can run here (and why not)."""
    from labkit import shapes, tiers
    from labkit.models import default_device, twin_names

    device = default_device()
    sdpa = {"flash": None, "efficient": None, "math": None}
    if device == "cuda":
        sdpa = {
            "flash": torch.backends.cuda.is_flash_attention_available(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": True,
        }
    optimizations = {}
    for name, entry in tiers.OPTIMIZATIONS.items():
        problems = [p for need in entry.needs if (p := tiers.missing(need)) is not None]
        optimizations[name] = problems[0] if problems else "ok"
    return {
        **environment(device),
        "sdpa_backends": sdpa,
        "optimizations": optimizations,
        "presets": {name: tiers.preset_problems(name) or "ok" for name in tiers.PRESETS},
        "sources": {
            "shapes": "ok" if (Path(shapes.MODEL_DIR) / "model_index.json").exists() else "not trained yet",
            "twins": twin_names(),
        },
    }


# ---------------------------------------------------------------------------------------------------
# Results as data
# ---------------------------------------------------------------------------------------------------


def append_results(path: str | Path, records: list[dict] | dict) -> None:
    """Append records to a JSON-lines file atomically (a crash never leaves half a file)."""
    path = Path(path)
    records = [records] if isinstance(records, dict) else records
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    new = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(old + new)
    os.replace(tmp.name, path)


def load_results(path: str | Path) -> list[dict]:
    """Read the records of a JSON-lines results file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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


def measured(record: dict) -> bool:
    """Whether a record holds measurements (not out of memory, unavailable here, or failed)."""
    return record["status"] in ("ok", "nan") and record.get("s_per_image") is not None


def results_table(records: list[dict], baseline: str | int | None = 0):
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


# ===================================================================================================
# Tier 2: memory, attention, compilation (chapters 4, 5 and 6)
# ===================================================================================================
#
# Helpers of the three Tier 2 chapters: a sweep of configurations over image sizes and memory caps
# (every configuration on its own pipeline; out of memory, unavailable and failed runs are records), a
# table for such records, the memory of the attention matrix that sliced attention materialises, the
# cost of compiling and its break-even point, recompilation counts, and a recommendation per GPU size.

TIER2_STATUSES = ("ok", "oom", "unavailable", "error", "nan")
"""Status of a Tier 2 record: measured, out of memory, not runnable here, failed otherwise, NaN images."""


def unavailable_record(label: str, reason: str, **fields) -> dict:
    """A record for a configuration that cannot run here (chapters 4-6): ``status="unavailable"``.

    ``reason`` says why (no CUDA GPU, a profile switch such as ``compile=False``, a missing package);
    ``fields`` add what the record would have measured (``size``, ``memory_cap_gb``, ...).
    """
    return {"label": label, "status": "unavailable", "reason": reason, **fields}


def _missing_before_loading(spec) -> str | None:
    """Why a configuration cannot run here, from its optimizations' declared needs (no pipeline needed)."""
    from labkit.tiers import OPTIMIZATIONS, missing, parse_step

    for step in spec:
        name, _ = parse_step(step) if isinstance(step, str) else step
        for need in OPTIMIZATIONS[name].needs if name in OPTIMIZATIONS else ():
            if (problem := missing(need)) is not None:
                return f"{name}: {problem}"
    return None


@contextmanager
def _without_known_notes():
    """Hide Dynamo's note on diffusers' cached version checks (harmless; it would fill chapter 6)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
        yield


@contextmanager
def _cap_or_nothing(cap: float | None, device):
    if cap is None:
        yield
    else:
        with memory_cap(cap, str(device)):
            yield


def _measure_one(pipe, label, size, cap, *, steps, batch, repeats, warmup, flops, breakdown) -> dict:
    """One benchmark (and optionally a time breakdown) of ``pipe`` under an optional memory cap."""
    device = pipe._execution_device
    fields = {"label": label, "size": size, "memory_cap_gb": cap, "measured_under_gb": cap}
    try:
        with _cap_or_nothing(cap, device), _without_known_notes():
            record = benchmark(
                pipe, steps=steps, size=size, batch=batch, repeats=repeats, warmup=warmup,
                label=label, flops=flops,
            ).record  # fmt: skip
            if breakdown and record["status"] == "ok":
                from labkit.profiling import time_breakdown

                record |= time_breakdown(pipe, warmup=0, steps=steps, size=size, batch=batch)
    except torch.OutOfMemoryError as error:  # e.g. in the profiled run
        release_memory(device)
        return {**fields, "status": "oom", "error": str(error).splitlines()[0], **environment(device)}
    except RuntimeError as error:  # e.g. "No available kernel" for a pinned SDPA backend
        release_memory(device)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {**fields, "status": "error", "error": message, **environment(device)}
    return record | fields


def sweep(
    load,
    configs: dict,
    *,
    sizes,
    steps: int,
    repeats: int,
    warmup: int,
    batch: int = 1,
    caps=(None,),
    breakdown: bool = False,
    flops: bool = False,
    prepare=None,
    say=print,
) -> list[dict]:
    """Benchmark each configuration at each image size under each memory cap (chapters 4, 5 and 6).

    ``load()`` returns a fresh pipeline; ``configs`` maps a label to what `labkit.apply` takes (a
    list of optimizations). Each configuration gets its own pipeline (offloading and compiling cannot
    be undone), used for all its sizes and caps, then freed. Caps are in GB (``None``: no cap) and run
    from the smallest up; a configuration that fitted under a cap is not run again under a larger one
    (a larger cap cannot make it run out of memory): its record is copied with ``measured_under_gb``
    naming the cap it was measured under. An optimization that cannot run here makes one
    ``"unavailable"`` record per size and cap, with the reason, and a printed ``unavailable:`` line;
    out of memory is a ``"oom"`` record, any other failure an ``"error"`` record with its message.
    With ``breakdown`` each measured record also holds `labkit.profiling.time_breakdown`'s fields.
    ``prepare(pipe)``, when given, runs after the configuration is applied (chapter 5 uses it to keep
    the VAE's attention off a pinned SDPA kernel).
    """
    import warnings

    from labkit.tiers import apply

    caps = sorted(caps, key=lambda c: float("inf") if c is None else c)
    records = []
    for label, spec in configs.items():
        pipe, reason = None, _missing_before_loading(spec)
        if reason is None:
            pipe = load()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unavailable steps are printed below instead
                changes = apply(pipe, spec)
            missing = [c for c in changes if c.status != "applied"]
            if missing:
                reason = "; ".join(f"{c.name}: {c.what}" for c in missing)
            elif prepare is not None:
                prepare(pipe)
        if reason is not None:
            say(f"unavailable: {label}: {reason}")
            where = environment(pipe.device if pipe is not None else None)
            records += [
                unavailable_record(label, reason, size=size, memory_cap_gb=cap, **where)
                for size in sizes
                for cap in caps
            ]
        else:
            for size in sizes:
                fitted = None
                for cap in caps:
                    if fitted is not None:
                        records.append(fitted | {"memory_cap_gb": cap})
                        continue
                    record = _measure_one(
                        pipe, label, size, cap, steps=steps, batch=batch, repeats=repeats,
                        warmup=warmup, flops=flops, breakdown=breakdown,
                    )  # fmt: skip
                    records.append(record)
                    if record["status"] == "ok" and cap is not None:
                        fitted = record
        if pipe is None:
            continue
        device = pipe._execution_device
        if hasattr(pipe, "remove_all_hooks"):
            pipe.remove_all_hooks()
        del pipe
        torch._dynamo.reset()  # compiled code of this configuration must not count against the next one
        release_memory(device)
    return records


TIER2_COLUMNS = {
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


def _note(r: dict) -> str:
    if r["status"] == "unavailable":
        return r.get("reason", "")
    if r["status"] in ("oom", "error"):
        return r.get("error", "")
    if r.get("memory_cap_gb") != r.get("measured_under_gb"):
        return f"fits under {r['measured_under_gb']:g} GB, so under this cap too (not run again)"
    return ""


def status_table(records: list[dict], baseline: str | None = None, extra=()):
    """A table of Tier 2 records of any status (chapters 4-6): time, memory, and why a row has no numbers.

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
            "note": _note(r),
        }
        row |= {name: r.get(name) if ok else None for name in extra}
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*TIER2_COLUMNS, *extra])
    if not any(r.get("memory_cap_gb") is not None for r in records):
        table = table.drop(columns="memory_cap_gb")
    if baseline is None:
        table = table.drop(columns="speedup")
    return table.rename(columns=TIER2_COLUMNS)


def attention_scores_gb(
    unet, size: int, batch: int = 1, *, slice_size: int | str | None = None, vae_scale_factor: int = 8,
    guidance: bool = True,
) -> dict:  # fmt: skip
    """Memory of the attention matrices that classic or sliced attention materialises (chapter 4).

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


def recommend(records: list[dict], device_gb: float | None = None):
    """The fastest configuration that ran, per GPU memory cap and image size (chapter 4's closing table).

    Built from `sweep` records: for each size and cap, the ``ok`` record with the lowest seconds per
    image, and how many configurations fitted. ``device_gb`` names the uncapped device's memory.
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
        gpu = (
            f"{cap:g} GB" if cap is not None else ("no cap" + (f" ({device_gb:.0f} GB)" if device_gb else ""))
        )
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


def compile_seconds(record: dict) -> float | None:
    """Time the warm-up call(s) took beyond steady-state calls: with torch.compile, the compile time (chapter 6)."""
    if record.get("status") != "ok" or record.get("warmup_s") is None:
        return None
    per_call = record["s_per_image"] * record["batch"]
    return max(0.0, record["warmup_s"] - record["warmup"] * per_call)


def break_even_images(reference: dict, compiled: dict) -> float | None:
    """Images after which compiling has paid for itself against ``reference`` (chapter 6).

    The compile cost is the compiled record's warm-up overhead minus the reference's (both from
    `compile_seconds`); the gain is the difference in seconds per image. ``inf`` when compiling does
    not make an image faster, ``None`` when a record did not run.
    """
    cost, base = compile_seconds(compiled), compile_seconds(reference)
    if cost is None or base is None:
        return None
    gain = reference["s_per_image"] - compiled["s_per_image"]
    if gain <= 0:
        return float("inf")
    return max(0.0, cost - base) / gain


def compile_table(records: list[dict], reference: str):
    """Compile time, steady-state time, speed-up and break-even images against ``reference`` (chapter 6)."""
    import pandas as pd

    ref = next((r for r in records if r["label"] == reference and r["status"] == "ok"), None)
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append(
            {
                "configuration": r["label"],
                "status": r["status"],
                "compile s": compile_seconds(r) if ok else None,
                "s / image": r.get("s_per_image") if ok else None,
                "speed-up": ref["s_per_image"] / r["s_per_image"] if ok and ref else None,
                "break-even images": break_even_images(ref, r) if ok and ref and r is not ref else None,
                "note": _note(r),
            }
        )
    return pd.DataFrame(rows)


def unet_inputs(unet, size: int, batch: int = 1, *, guidance: bool = True, vae_scale_factor: int = 8):
    """Random inputs for one UNet call at ``size`` px for ``batch`` images (x2 with guidance) (chapter 6)."""
    rows = batch * (2 if guidance else 1)
    side = size // vae_scale_factor
    options = {"device": unet.device, "dtype": unet.dtype}
    args = (
        torch.randn(rows, unet.config.in_channels, side, side, **options),
        torch.tensor(10, device=unet.device),
        torch.randn(rows, 77, unet.config.cross_attention_dim, **options),
    )
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and size ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, **options),
            "time_ids": torch.zeros(rows, 6, **options),
        }
    return args, kwargs


def _block_inputs(unet, block, size: int, batch: int = 1, *, vae_scale_factor: int = 8):
    side = size // vae_scale_factor
    options = {"device": unet.device, "dtype": unet.dtype}
    hidden = torch.randn(2 * batch, side * side, block.norm1.normalized_shape[0], **options)
    context = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, **options)
    return (hidden,), {"encoder_hidden_states": context}


def compile_piece(unet, piece: str = "unet"):
    """What chapter 6 counts recompilations on: ``(module, make_inputs)``, ``make_inputs(size, batch)``.

    ``piece="unet"``: the whole UNet, with `unet_inputs`. ``piece="block"``: only its first
    transformer block (the small piece the ``ci`` profile traces: seconds instead of a minute), with
    hidden states of the tokens of the UNet's first level at ``size`` px.
    """
    if piece == "unet":
        return unet, functools.partial(unet_inputs, unet)
    if piece == "block":
        block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
        return block, functools.partial(_block_inputs, unet, block)
    raise ValueError(f"unknown piece {piece!r}: 'unet' or 'block'")


def recompilations(module, make_inputs, shapes, settings: dict, *, backend: str = "eager") -> list[dict]:
    """Count the graphs torch.compile builds as the input shape changes (chapter 6).

    For each setting (a label mapped to ``torch.compile`` options; ``regional=True`` compiles only the
    repeated blocks, `compile_repeated_blocks`), a copy of ``module`` is compiled and called on each
    shape in turn (``make_inputs(size, batch)`` returns ``(args, kwargs)``), each twice. The record
    per shape (``label``: the setting) says how many new graphs Dynamo captured (its counters), the
    first call's time and the second's: the difference is the price of the new graphs. The counts are
    Dynamo's (its guards decide when to recompile), the same with every backend; ``backend="eager"``
    skips code generation, so the times hold the tracing only.
    """
    import copy

    from torch._dynamo.utils import counters

    device = next(module.parameters()).device
    where = environment(device)["device"]
    records = []
    for name, options in settings.items():
        options = dict(options)
        regional = options.pop("regional", False)
        torch._dynamo.reset()
        counters.clear()
        compiled = copy.deepcopy(module)
        if regional:
            compiled.compile_repeated_blocks(backend=backend, **options)
        else:
            compiled = torch.compile(compiled, backend=backend, **options)
        before = 0
        for size, batch in shapes:
            args, kwargs = make_inputs(size, batch)
            times = []
            with torch.inference_mode(), _without_known_notes():
                for _ in range(2):
                    seconds, _ = _timed(functools.partial(compiled, *args, **kwargs), device)
                    times.append(seconds)
            graphs = counters["stats"]["unique_graphs"]
            records.append(
                {
                    "label": name,
                    "status": "ok",
                    "kind": "recompilation",
                    "backend": backend,
                    "module": type(module).__name__,
                    "device": where,
                    "size": size,
                    "batch": batch,
                    "new_graphs": graphs - before,
                    "graphs": graphs,
                    "first_call_s": times[0],
                    "second_call_s": times[1],
                }
            )
            before = graphs
        del compiled
        torch._dynamo.reset()
        release_memory(device)
    return records
