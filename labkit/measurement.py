"""Measurement: the one timer, the one FLOP counter, `benchmark` of a whole generation, and costs of parts.

The rules: warm-up excluded and reported apart (it holds the compile time); repeats, median and spread;
CUDA synchronised around every timed call (`timed`); peak memory from the CUDA allocator; FLOPs from
``torch.utils.flop_counter.FlopCounterMode`` (`count_flops`), on the "meta" device where only shapes
matter; utilisation against a matmul peak measured in the same process, in the same dtype. An
out-of-memory run is a record (``status="oom"``) that keeps what was measured before, not a crash;
NaN images are counted and make the record ``"nan"``.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from labkit.devices import (
    environment,
    peak_memory,
    release_memory,
    reset_peak_memory,
    synchronize,
)
from labkit.models import call_settings, generate, quiet_diffusers, unet_inputs

STATUSES = ("ok", "oom", "nan", "unavailable", "error")
"""The status of a record: measured, out of memory, NaN images, cannot run here, failed otherwise."""


@dataclass
class Result:
    """One benchmarked configuration: ``record`` (JSON-able) and the ``images`` of its last run."""

    record: dict
    images: np.ndarray | None = None

    def __repr__(self) -> str:
        r = self.record
        if r["status"] == "oom":
            return f"Result({r['label']!r}: out of memory)"
        if r.get("s_per_image") is None:
            return f"Result({r['label']!r}: status {r['status']})"
        return f"Result({r['label']!r}: {r['s_per_image']:.3f} s/image, status {r['status']})"


# ---------------------------------------------------------------------------------------------------
# The timer
# ---------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device) -> tuple[float, object]:
    """Run ``fn()`` between two device synchronisations; return its wall time in seconds and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def time_calls(fn: Callable[[], object], device, *, warmup: int, repeats: int) -> dict:
    """``warmup`` calls (timed apart), then ``repeats`` timed calls: median, spread and peak memory."""
    device = torch.device(device)
    warmup_times = [timed(fn, device)[0] for _ in range(warmup)]
    reset_peak_memory(device)
    times = [timed(fn, device)[0] for _ in range(repeats)]
    return {
        "seconds": statistics.median(times),
        "seconds_min": min(times),
        "seconds_max": max(times),
        "times_s": times,
        "warmup_s": sum(warmup_times) if warmup_times else None,
        "peak_allocated_gb": peak_memory(device)["peak_allocated_gb"],
    }


# ---------------------------------------------------------------------------------------------------
# The FLOP counter
# ---------------------------------------------------------------------------------------------------

FLOP_KINDS = ("convolution", "attention", "linear", "other")
"""How `count_flops` groups aten ops: convolutions, attention (QK^T and AV), linear layers, the rest."""


def _flop_kind(op) -> str:
    name = str(op).removeprefix("aten.").split(".")[0]
    if name.startswith("convolution"):
        return "convolution"
    if name in ("bmm", "baddbmm") or name.startswith("_scaled_dot_product"):
        return "attention"
    if name in ("mm", "addmm", "linear"):
        return "linear"
    return "other"


def count_flops(fn: Callable[[], object]) -> dict:
    """FLOPs of ``fn()``, in all (``flops``) and by kind (``flops_convolution``, ``flops_attention``, ...).

    On the "meta" device it counts without computing or allocating: the counter needs only shapes.
    Kernels the counter does not know (xFormers, int8 matmuls) are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = {f"flops_{kind}": 0 for kind in FLOP_KINDS}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        counts[f"flops_{_flop_kind(op)}"] += flops
    return {"flops": counter.get_total_flops(), **counts}


@contextmanager
def _uncompiled(pipe):
    """Swap a compiled UNet for its original (FlopCounterMode counts eager ops)."""
    unet = pipe.unet
    if hasattr(unet, "_orig_mod"):
        pipe.unet = unet._orig_mod
    try:
        yield
    finally:
        pipe.unet = unet


def generation_flops(pipe, settings: dict, evaluations: int) -> dict:
    """FLOPs per image of a whole generation (text encoder, every UNet evaluation, VAE decode).

    Counting all steps would be slow, so it counts runs of 1 and 2 steps: their difference is the cost
    of the denoiser evaluations added, and the total is extrapolated to ``evaluations``.
    """
    counts = {}
    with _uncompiled(pipe):
        for steps in (1, 2):
            flops = count_flops(lambda steps=steps: generate(pipe, **(settings | {"steps": steps})))["flops"]
            counts[steps] = (flops, len(pipe.scheduler.timesteps))
    (f1, n1), (f2, n2) = counts[1], counts[2]
    per_evaluation = (f2 - f1) / (n2 - n1)
    total = f1 + (evaluations - n1) * per_evaluation
    return {
        "flops_per_image": total / settings["batch"],
        "denoiser_flops_per_evaluation": per_evaluation / settings["batch"],
    }


@functools.cache
def _matmul_peak(device_type: str, dtype: torch.dtype, tf32: bool) -> float:
    n = 8192 if device_type == "cuda" else 1024
    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b, device_type)[0] for _ in range(10 if device_type == "cuda" else 3))
    return 2 * n**3 / best / 1e12


def matmul_peak_tflops(device, dtype: torch.dtype) -> float:
    """The best dense matmul rate (TFLOP/s) reached on ``device`` in ``dtype`` (and the current TF32
    setting), measured once per process: the denominator of utilisation."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float16
    # fp32 matmuls run on TF32 tensor cores when the tf32 optimization is on: a different peak
    return _matmul_peak(torch.device(device).type, dtype, torch.backends.cuda.matmul.allow_tf32)


def utilisation(flops_per_image: float, s_per_image: float, peak_tflops: float) -> dict:
    """The share of the matmul peak a run reached; above 1 is flagged, with the reason, never hidden."""
    value = flops_per_image / s_per_image / (peak_tflops * 1e12)
    out = {"matmul_peak_tflops": peak_tflops, "utilisation": value}
    if value > 1:
        out["utilisation_note"] = (
            "above 1: the model's kernels in this dtype beat the plain matmul probe on this device "
            "(on a CPU, half-precision matmuls have no fast path), so the peak is not a ceiling here"
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Records of a whole generation
# ---------------------------------------------------------------------------------------------------


def describe(pipe) -> dict:
    """What a pipeline is made of and what was applied to it, for the record."""
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


def failure(error: BaseException) -> dict:
    """The fields of a record whose measurement failed: ``oom`` or ``error``, with the first line of why."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    status = "oom" if isinstance(error, torch.OutOfMemoryError) else "error"
    return {"status": status, "error": message}


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

    ``warmup`` calls run first (their time is ``warmup_s``: with torch.compile it holds the compile
    time); then ``repeats`` timed calls, each between two CUDA synchronisations. Peak memory covers the
    timed calls. Settings left unset come from the applied preset. Running out of memory anywhere (a
    timed call, the FLOP count, the matmul probe) gives ``status="oom"`` with what was measured before.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, not {repeats} and {warmup}")
    if isinstance(prompt, list):  # a list of prompts is the batch
        batch = len(prompt)
    settings = call_settings(pipe, steps=steps, size=size, batch=batch, guidance=guidance)
    device = pipe._execution_device
    record = {
        "label": label or getattr(pipe, "labkit_preset", None) or "custom",
        "source": getattr(pipe, "labkit_source", None),
        "status": "ok",
        **describe(pipe),
        **settings,
        "repeats": repeats,
        "warmup": warmup,
        **environment(device),
    }
    call = dict(prompt=prompt, seed=seed, **settings)
    pipe.set_progress_bar_config(disable=True)
    images = None
    try:
        warmup_times = [timed(lambda: generate(pipe, **call), device)[0] for _ in range(warmup)]
        reset_peak_memory(device)
        times = []
        for _ in range(repeats):
            seconds, images = timed(lambda: generate(pipe, **call), device)
            times.append(seconds)
        per_image = [t / settings["batch"] for t in times]
        record |= {
            "s_per_image": statistics.median(per_image),
            "s_per_image_min": min(per_image),
            "s_per_image_max": max(per_image),
            "images_per_s": settings["batch"] / statistics.median(times),
            "warmup_s": sum(warmup_times) if warmup_times else None,
            "times_s": times,
            **peak_memory(device),
            # the number of UNet calls (PNDM makes one more than its step count)
            "denoiser_evaluations": len(pipe.scheduler.timesteps)
            if pipe.scheduler.timesteps is not None
            else None,
            **image_check(images),
        }
        if record["nan_images"]:
            record["status"] = "nan"
        if flops:
            record |= generation_flops(pipe, settings, record["denoiser_evaluations"])
            peak = matmul_peak_tflops(device, pipe.unet.dtype)
            record |= utilisation(record["flops_per_image"], record["s_per_image"], peak)
    except torch.OutOfMemoryError as error:
        release_memory(device)
        record |= failure(error)
    return Result(record, images)


def measured(record: dict) -> bool:
    """Whether a record holds timings (not out of memory, unavailable here, or failed)."""
    return record.get("status") in ("ok", "nan") and record.get("s_per_image") is not None


def compile_seconds(record: dict) -> float | None:
    """Time the warm-up call(s) took beyond steady-state calls: with torch.compile, the compile time."""
    if record.get("status") != "ok" or record.get("warmup_s") is None:
        return None
    per_call = record["s_per_image"] * record["batch"]
    return max(0.0, record["warmup_s"] - record["warmup"] * per_call)


def break_even_images(reference: dict, compiled: dict) -> float | None:
    """Images after which compiling has paid for itself against ``reference``.

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


# ---------------------------------------------------------------------------------------------------
# Costs of one part: a bare UNet evaluation, a VAE encode or decode
# ---------------------------------------------------------------------------------------------------


def unet_cost(
    config: dict,
    *,
    side: int,
    batch: int,
    device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
) -> dict:
    """Parameters and FLOPs (counted on "meta") of one evaluation of ``UNet2DConditionModel(**config)`` on
    ``batch`` latents of ``side`` x ``side``; with ``repeats`` > 0 also its time, with random weights on
    ``device``. Out of memory while timing keeps the counts and adds ``status="oom"`` and the error."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel(**config)
        inputs = unet_inputs(meta, side=side, batch=batch, device="meta", dtype=torch.float32)
        out = {
            "parameters": sum(p.numel() for p in meta.parameters()),
            "in_channels": meta.config.in_channels,
            **count_flops(lambda: meta(**inputs)),
        }
    if repeats < 1:
        return out
    unet = None
    try:
        torch.manual_seed(0)
        with torch.device(device), quiet_diffusers():
            unet = UNet2DConditionModel(**config).to(dtype).eval()
        inputs = unet_inputs(unet, side=side, batch=batch)

        def evaluate(unet=unet, inputs=inputs):
            with torch.inference_mode():
                unet(**inputs)

        return out | time_calls(evaluate, device, warmup=warmup, repeats=repeats)
    except torch.OutOfMemoryError as error:  # the counts stand: keep them beside the failure
        return out | failure(error)
    finally:
        del unet
        release_memory(device)


def vae_cost(
    config: dict, *, part: str, size: int, device, dtype: torch.dtype, repeats: int, warmup: int
) -> dict:
    """FLOPs (counted on "meta") and time of ``AutoencoderKL(**config)`` encoding (``part="encode"``) or
    decoding one ``size`` px image, with random weights on ``device``. Out of memory while timing keeps
    the counts and adds ``status="oom"`` and the error."""
    from diffusers import AutoencoderKL

    if part not in ("encode", "decode"):
        raise ValueError(f"part is 'encode' or 'decode', not {part!r}")
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    channels = config.get("latent_channels", 4)
    shape = (1, 3, size, size) if part == "encode" else (1, channels, size // factor, size // factor)

    def run(vae, x):
        with torch.inference_mode():
            return vae.encode(x).latent_dist.mode() if part == "encode" else vae.decode(x).sample

    with torch.device("meta"):
        meta = AutoencoderKL(**config)
        out = count_flops(lambda: run(meta, torch.randn(shape)))
    if repeats < 1:
        return out
    vae = None
    try:
        torch.manual_seed(0)
        with torch.device(device), quiet_diffusers():
            vae = AutoencoderKL(**config).to(dtype).eval()
        x = torch.randn(shape, device=device, dtype=dtype)
        return out | time_calls(lambda vae=vae: run(vae, x), device, warmup=warmup, repeats=repeats)
    except torch.OutOfMemoryError as error:  # the counts stand: keep them beside the failure
        return out | failure(error)
    finally:
        del vae
        release_memory(device)
