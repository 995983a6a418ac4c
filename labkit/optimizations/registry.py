"""The registry every optimization registers into: `optimization`, `Change`, `Unavailable`, `missing`.

An optimization is one function ``fn(pipe, **options) -> str`` that changes a pipeline with the current
diffusers API and returns what it changed. The `optimization` decorator registers it in `OPTIMIZATIONS`
with its tier in the guide, its stage (the order `labkit.optimizations.apply` runs it in) and what it
needs (a CUDA GPU, xFormers, torchao); the wrapper checks those needs first, raising `Unavailable`
with the reason, and records a `Change` on the pipeline. Only this wrapper and `labkit.load_pipeline`
write the pipeline's ``labkit_*`` attributes.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class Unavailable(RuntimeError):
    """An optimization that cannot run here; the message says why and what to do."""


@dataclass
class Change:
    """What one optimization did to a pipeline (``status`` is ``"applied"`` or ``"unavailable"``)."""

    name: str
    status: str
    what: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        # a module given as an option (a student UNet) is named, not printed whole
        options = ", ".join(
            f"{k}=<{type(v).__name__}>" if isinstance(v, torch.nn.Module) else f"{k}={v}"
            for k, v in self.options.items()
        )
        name = f"{self.name}({options})" if options else self.name
        return f"{name}: {self.what}" if self.status == "applied" else f"{name}: UNAVAILABLE ({self.what})"


# apply() runs optimizations by stage: samplers first, precision before quantization, compile last.
SAMPLER, SWAP, PRECISION, ATTENTION, LAYOUT, QUANTIZE, OFFLOAD, COMPILE = range(8)


@dataclass(frozen=True)
class Optimization:
    """A registry entry: the function, its tier in the guide, its stage in `apply`, what it needs."""

    name: str
    fn: Callable[..., Change]
    tier: int
    stage: int
    needs: tuple[str, ...]
    family: str

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    @property
    def options(self) -> dict[str, inspect.Parameter]:
        """The keyword options the function takes, with their defaults and annotations."""
        parameters = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p for p in parameters}


OPTIMIZATIONS: dict[str, Optimization] = {}
"""Every registered optimization, by name."""


@functools.cache
def xformers_problem() -> str | None:
    """Why xFormers cannot run here, or None. Imports it and runs one tiny attention on the GPU."""
    if importlib.util.find_spec("xformers") is None:
        return "xFormers is not installed: pip install 'labkit[xformers]' (its wheel must match your torch)"
    if not torch.cuda.is_available():
        return "xFormers is installed, but its kernels need a CUDA GPU and none is visible"
    try:
        import xformers.ops

        q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as error:  # a wheel built for another torch fails here, in many ways
        return f"xFormers is installed but cannot run with this torch ({torch.__version__}): {error}"
    return None


def missing(need: str, pipe=None) -> str | None:
    """Why requirement ``need`` (``cuda``, ``xformers``, ``torchao``, ``fp8``) is not met here, or None."""
    if need == "cuda":
        if not torch.cuda.is_available():
            return "needs a CUDA GPU; none is visible here"
        if pipe is not None and execution_device(pipe).type != "cuda":
            return "needs the pipeline on a CUDA GPU: load it with device='cuda'"
        return None
    if need == "xformers":
        return xformers_problem()
    if need == "torchao":
        if importlib.util.find_spec("torchao") is None:
            return "needs torchao: pip install 'labkit[quant]'"
        return None
    if need == "fp8":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            return "needs a GPU with fp8 tensor cores (Ada or Hopper, compute capability 8.9+)"
        return None
    raise ValueError(f"unknown requirement {need!r}")


def execution_device(pipe) -> torch.device:
    """The device a pipeline computes on (its GPU even while offloaded weights wait on the CPU)."""
    return pipe._execution_device


def record_change(pipe, change: Change, *, replaces_stage: int | None = None) -> None:
    """Add ``change`` to the pipeline's record of what was applied (``replaces_stage``: it takes the place
    of that stage's earlier change, as a new sampler replaces the previous one, keeping the order)."""
    changes = list(getattr(pipe, "labkit_applied", []))
    if replaces_stage is not None:
        same = [
            i
            for i, c in enumerate(changes)
            if c.name in OPTIMIZATIONS and OPTIMIZATIONS[c.name].stage == replaces_stage
        ]
        if same:
            changes[same[0]] = change
            pipe.labkit_applied = [c for i, c in enumerate(changes) if i not in same[1:]]
            return
    pipe.labkit_applied = [*changes, change]


def set_call(pipe, **settings) -> str:
    """Record the call settings (steps, guidance, ...) an optimization or preset implies; describe them."""
    call = getattr(pipe, "labkit_call", {})
    changes = [f"{k} {call.get(k, 'default')} -> {v}" for k, v in settings.items()]
    pipe.labkit_call = call | settings
    return "; ".join(changes)


def optimization(*, tier: int, stage: int, needs: tuple[str, ...] = ()):
    """Register ``fn`` as an optimization; the wrapper checks ``needs`` and records the `Change`."""

    def register(fn: Callable[..., str]) -> Callable[..., Change]:
        @functools.wraps(fn)
        def wrapper(pipe, **options) -> Change:
            for need in needs:
                if (problem := missing(need, pipe)) is not None:
                    raise Unavailable(f"{fn.__name__}: {problem}")
            what = fn(pipe, **options)
            change = Change(fn.__name__, "applied", what, options)
            record_change(pipe, change, replaces_stage=SAMPLER if stage == SAMPLER else None)
            return change

        family = fn.__module__.rsplit(".", 1)[-1]
        OPTIMIZATIONS[fn.__name__] = Optimization(fn.__name__, wrapper, tier, stage, needs, family)
        return wrapper

    return register
