"""Where the time goes: the share of a generation spent in the UNet, in attention, in the VAE, and how
busy the GPU really is (torch.profiler).

On a GPU, batch 1 is often launch-bound (the GPU idles between small kernels: a low ``busy_share``);
attention's share of the UNet time bounds what a faster attention kernel can save.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from labkit.devices import synchronize
from labkit.models import generate

REGIONS = ("text_encoder", "unet", "attention", "vae_decode")


@contextmanager
def _annotated(pipe):
    """Label the regions of a generation for the profiler: ``labkit::unet``, ``labkit::attention``, ...

    Wraps the forward of the text encoder, the UNet, every attention module of the UNet, and the VAE
    decode; restores them on exit. Compiled modules are profiled through their eager original.
    """
    from diffusers.models.attention_processor import Attention

    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    targets = [(pipe.text_encoder, "forward", "text_encoder"), (unet, "forward", "unet")]
    targets += [(m, "forward", "attention") for m in unet.modules() if isinstance(m, Attention)]
    targets += [(pipe.vae, "decode", "vae_decode")]
    for obj, method, region in targets:
        original = getattr(obj, method)

        def wrapped(*args, _original=original, _region=region, **kwargs):
            with record_function(f"labkit::{_region}"):
                return _original(*args, **kwargs)

        setattr(obj, method, wrapped)
    compiled = pipe.unet
    pipe.unet = unet
    try:
        yield
    finally:
        pipe.unet = compiled
        for obj, method, _ in targets:
            delattr(obj, method)  # the instance attribute goes; the class's method shows again


@contextmanager
def quiet_stderr():
    """Silence the C++ side's stderr for a moment (torch's profiler prints a line at each start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of time intervals (overlapping kernels on several streams count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def time_breakdown(pipe, *, warmup: int = 1, **generate_kwargs) -> dict:
    """Profile one generation and say where its time went.

    Returns seconds per region (``text_encoder``, ``unet``, ``attention`` inside the UNet,
    ``vae_decode``), ``attention_share`` (attention over UNet time) and, on a GPU, ``busy_share``: the
    time at least one kernel ran, over the wall time of an unprofiled run (the profiler itself slows
    the host, so the wall time is taken without it). Region times are GPU kernel times on a GPU, CPU
    times on a CPU. Runs ``warmup`` unprofiled generations first.
    """
    device = pipe._execution_device
    on_gpu = device.type == "cuda"
    for _ in range(warmup):
        generate(pipe, **generate_kwargs)
    synchronize(device)
    start = time.perf_counter()
    generate(pipe, **generate_kwargs)
    synchronize(device)
    wall = time.perf_counter() - start

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with _annotated(pipe), quiet_stderr(), profile(activities=activities) as prof:
        generate(pipe, **generate_kwargs)
        synchronize(device)

    totals = {region: 0.0 for region in REGIONS}
    for event in prof.key_averages():
        if event.key.startswith("labkit::"):
            region = event.key.removeprefix("labkit::")
            seconds = (event.device_time_total if on_gpu else event.cpu_time_total) / 1e6
            totals[region] = max(totals[region], seconds)  # a range may be listed for the CPU and the GPU
    breakdown = {f"{region}_s": seconds for region, seconds in totals.items()}
    breakdown["wall_s"] = wall
    breakdown["attention_share"] = totals["attention"] / totals["unet"] if totals["unet"] else None
    if on_gpu:
        kernels = [
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
        breakdown["gpu_busy_s"] = _union_us(kernels) / 1e6
        breakdown["busy_share"] = breakdown["gpu_busy_s"] / wall
    else:
        breakdown["gpu_busy_s"] = breakdown["busy_share"] = None
    return breakdown
