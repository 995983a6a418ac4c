"""The device layer: which device, its readable name, the one environment record, and GPU memory.

Everything above asks here, so that every record names its device the same way:

- `default_device`, `resolve_device` (``"cuda"`` becomes ``cuda:0``, an index every CUDA call accepts);
- `device_name`: the GPU model, or the CPU model and its core count (``"NVIDIA H200"``,
  ``"Intel(R) Xeon(R) Platinum 8488C, 2 cores"``);
- `environment`: device, driver and library versions, stamped on every record;
- `synchronize`, `release_memory`, `reset_peak_memory`, `peak_memory`, `memory_cap`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import torch

from labkit._version import __version__

GB = 1e9
"""Memory is reported in units of 1e9 bytes, as the reference GPU run does."""


def default_device() -> str:
    """``"cuda"`` when a CUDA GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A `torch.device` with an index for CUDA (``"cuda"`` -> ``cuda:0``): some CUDA calls need one.

    Raises ``ValueError`` with what to use instead for a device this machine does not have.
    """
    try:
        device = torch.device(device or default_device())
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is visible: use 'cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda' (or 'cuda:N')")
    return device


@functools.cache
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device | None = None) -> str:
    """A readable name for a device: the GPU model, or the CPU model and its core count.

    This is the ``device`` of every record, and names the records store's file for that device.
    """
    device = torch.device(device or default_device())
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(resolve_device(device))
    return f"{_cpu_model()}, {os.cpu_count()} cores"


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


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str | torch.device | None = None) -> dict:
    """Where a record was measured: device, driver and library versions, and the time (UTC).

    Stamped on every record, so that a number always says where it comes from.
    """
    device = torch.device(device or default_device())
    details: dict = {}
    if device.type == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(resolve_device(device))
        details = {
            "gpu_memory_gb": properties.total_memory / GB,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    return {
        "device": device_name(device),
        **details,
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "labkit": __version__,
        "python": platform.python_version(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def synchronize(device: str | torch.device) -> None:
    """Wait for the GPU to finish its queued work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: str | torch.device) -> None:
    """Free what Python and the CUDA caching allocator still hold (between measurements, after an OOM)."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str | torch.device) -> dict:
    """Peak GB held by tensors and reserved by the caching allocator since the last reset (None on a CPU)."""
    if torch.device(device).type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {
        "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
    }


def cap_problem(gigabytes: float | None, device: str | torch.device | None = None) -> str | None:
    """Why GPU memory cannot be capped at ``gigabytes`` on ``device`` (None when it can)."""
    if gigabytes is None:
        return None
    if not gigabytes > 0:
        return f"a memory cap must be a positive number of GB, not {gigabytes}"
    if torch.device(device or default_device()).type != "cuda" or not torch.cuda.is_available():
        return "a memory cap needs a CUDA GPU (there is no GPU memory to cap on a CPU)"
    return None


@contextlib.contextmanager
def memory_cap(gigabytes: float, device: str | torch.device = "cuda") -> Iterator[None]:
    """Pretend the GPU has only ``gigabytes`` of memory (`torch.cuda.set_per_process_memory_fraction`).

    The CUDA context itself is not counted: a real card of that size is a little tighter still.
    """
    if (problem := cap_problem(gigabytes, device)) is not None:
        raise ValueError(problem)
    device = resolve_device(device)
    torch.cuda.empty_cache()  # memory cached by earlier work would otherwise count against the cap
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gigabytes * GB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
