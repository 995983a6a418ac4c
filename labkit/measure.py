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
def _matmul_peak(device_type: str, dtype: torch.dtype) -> float:
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
    """The best dense matmul rate (TFLOP/s) reached on ``device`` in ``dtype``, measured once per process."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float16
    return _matmul_peak(torch.device(device).type, dtype)


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
        ok = r["status"] != "oom"
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
