"""Scenarios: every measurement of the lab declared as data, measured once, kept in the records store.

A `Scenario` names a setup: what to build (source, dtype, optimizations), how to call it (size, steps,
batch, guidance), what to measure (its ``kind``: ``generate`` times a whole generation; ``quality``
scores prompt accuracy and FID on ``shapes``; ``unet_cost`` and ``vae_cost`` count and time one part;
a chapter may register a kind of its own) and how often (repeats, warm-up, images). Its `Scenario.key`
is a hash of that setup; its label and notes only name it.

`measure` is the one path every number takes::

    scenario -> store lookup -> load_pipeline -> apply -> measurer -> record -> store

It looks each scenario up in the store (same key, same code fingerprint, same device; for device-
independent kinds such as quality, any device), measures only what is missing, appends each record
as soon as it exists (an interrupted run keeps what it finished), and returns one record per scenario,
in order, labelled as the caller named it. The same setup asked for twice, or by two chapters, is
measured once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit import quality
from labkit._version import __version__
from labkit.devices import (
    cap_problem,
    device_name,
    environment,
    memory_cap,
    release_memory,
    resolve_device,
)
from labkit.measurement import benchmark, describe, failure, image_check, unet_cost, vae_cost
from labkit.models import SourceError, load_pipeline, shapes_variants, twin_names
from labkit.optimizations import OPTIMIZATIONS, apply, check_steps, closest, step_problem
from labkit.optimizations.registry import SAMPLER
from labkit.records import RecordsError, Store, fingerprint

# ---------------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One measurement, as data. Everything but ``label`` and ``notes`` is its setup, and makes its key.

    ``optimizations`` is a preset name or a list of steps (names, ``"name:key=value"`` or
    ``(name, options)``); if any of them cannot run here, the record is ``unavailable`` with the reason
    (to run a preset as far as a device allows, list the steps that can: `labkit.book.adapt_preset`); ``options`` holds what a kind needs beyond the common fields (a UNet config
    for ``unet_cost``, a reference scenario's setup for a quality PSNR). ``notes`` are copied into the
    record as they are (a sampler's display name, the steps a profile left out and why).
    """

    kind: str = "generate"
    source: str = "shapes"
    dtype: str = "float32"
    optimizations: str | tuple = ()
    size: int | None = None
    steps: int | None = None
    batch: int = 1
    guidance: float | None = None
    repeats: int = 3
    warmup: int = 1
    flops: bool = False
    breakdown: bool = False
    memory_cap_gb: float | None = None
    n: int = 0
    seed: int = 0
    options: dict = field(default_factory=dict)
    label: str = ""
    notes: dict = field(default_factory=dict)

    def steps_list(self) -> str | list[tuple[str, dict]]:
        """The optimizations in canonical form: a preset name, or checked ``(name, options)`` pairs."""
        if isinstance(self.optimizations, str):
            check_steps(self.optimizations)  # a known preset
            return self.optimizations
        return check_steps(list(self.optimizations))

    def setup(self) -> dict:
        """What was measured, as a JSON-able dict: the scenario without its label and notes."""
        setup = {k: v for k, v in asdict(self).items() if k not in ("label", "notes")}
        steps = self.steps_list()
        setup["optimizations"] = steps if isinstance(steps, str) else [[n, o] for n, o in steps]
        return json.loads(json.dumps(setup, sort_keys=True, default=str))

    @property
    def key(self) -> str:
        """A short hash of `setup`: the scenario's identity in the records store."""
        text = json.dumps(self.setup(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def but(self, **changes) -> Scenario:
        """A copy with some fields changed (``base.but(size=1024, label="large")``)."""
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------------------
# Measurers: what each kind of scenario measures
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurer:
    """How one kind of scenario is measured.

    ``fn(scenario, pipe, device) -> dict`` returns the record's measured fields (``pipe`` is the built
    pipeline when ``pipeline`` is true, else None). ``device_independent(scenario)`` says whether a
    record measured on another device answers too (quality on ``shapes``, FLOPs counted on "meta").
    """

    kind: str
    fn: Callable[[Scenario, Any, torch.device], dict]
    pipeline: bool
    device_independent: Callable[[Scenario], bool]
    files: tuple[str, ...]


MEASURERS: dict[str, Measurer] = {}
"""Every kind of scenario, by name."""

# the modules whose code decides a measured number: a change to any of them re-measures
_PACKAGE = Path(__file__).resolve().parent
_MEASURING = [
    "_version.py",
    "devices.py",
    "records.py",
    "models.py",
    "measurement.py",
    "profiling.py",
    "quality.py",
    "scenarios.py",
    "optimizations/*.py",
    "shapes/*.py",
    "shapes/*.json",
    "shapes/*.safetensors",
    "shapes/model/**/*.json",
    "shapes/model/**/*.safetensors",
    "shapes/variants/**/*.json",
    "shapes/variants/**/*.safetensors",
    "twins/*.json",
]


@functools.cache
def _core_files() -> tuple[Path, ...]:
    return tuple(sorted({p for pattern in _MEASURING for p in _PACKAGE.glob(pattern) if p.is_file()}))


@functools.cache
def code_fingerprint(*files: str) -> str:
    """The fingerprint of labkit's measuring code (its version, core modules, shipped weights) and ``files``."""
    return fingerprint([*_core_files(), *map(Path, files)], __version__)


def measurer(
    kind: str, *, pipeline: bool = True, device_independent: bool | Callable[[Scenario], bool] = False
):
    """Register ``fn`` as the measurer of scenarios of ``kind`` (see `Measurer`).

    The module that defines ``fn`` is part of the fingerprint of its records: changing it re-measures.
    """

    def register(fn):
        independent = (
            device_independent if callable(device_independent) else (lambda s, v=device_independent: v)
        )
        module = sys.modules.get(fn.__module__)
        files = (
            (str(Path(module.__file__).resolve()),) if module and getattr(module, "__file__", None) else ()
        )
        MEASURERS[kind] = Measurer(kind, fn, pipeline, independent, files)
        return fn

    return register


@measurer("generate")
def _generate(scenario: Scenario, pipe, device) -> dict:
    """A whole generation: time, peak memory, FLOPs (``flops``), where the time goes (``breakdown``)."""
    record = benchmark(
        pipe,
        steps=scenario.steps,
        size=scenario.size,
        batch=scenario.batch,
        guidance=scenario.guidance,
        repeats=scenario.repeats,
        warmup=scenario.warmup,
        seed=scenario.seed,
        label=scenario.label,
        flops=scenario.flops,
    ).record
    if scenario.breakdown and record["status"] == "ok":
        from labkit.profiling import time_breakdown

        settings = {k: record[k] for k in ("steps", "size", "batch", "guidance")}
        record |= time_breakdown(pipe, warmup=0, seed=scenario.seed, **settings)
    return record


# images of the quality scenarios measured in this process, by key: a later scenario's same-seed PSNR
# against them needs no second generation
_IMAGES: dict[str, np.ndarray] = {}


def _quality_images(scenario: Scenario, pipe) -> tuple[dict, np.ndarray]:
    scores = quality.evaluate(
        pipe,
        n=scenario.n,
        steps=scenario.steps or quality.DEFAULT_STEPS,
        guidance=quality.DEFAULT_GUIDANCE if scenario.guidance is None else scenario.guidance,
        seed=scenario.seed,
        return_images=True,
        batch_size=scenario.options.get("chunk", 100),
    )
    images = scores.pop("images")
    scores.pop("prompts")
    _IMAGES[scenario.key] = images
    while len(_IMAGES) > 8:
        _IMAGES.pop(next(iter(_IMAGES)))
    return scores, images


@measurer("quality", device_independent=True)
def _quality(scenario: Scenario, pipe, device) -> dict:
    """Prompt accuracy and FID on ``n`` held-out prompts of ``shapes``; with ``options["reference"]`` (a
    scenario's setup) also the same-seed PSNR against that scenario's images."""
    if scenario.n < 1:
        raise ValueError(f"a quality scenario needs n >= 1 images, not {scenario.n}")
    scores, images = _quality_images(scenario, pipe)
    check = image_check(images)
    record = describe(pipe) | {
        "source": scenario.source,
        "status": "nan" if check["nan_images"] else "ok",
        **scores,
        "denoiser_evaluations": len(pipe.scheduler.timesteps),
        **check,
    }
    if "reference" in scenario.options:
        reference = Scenario(**scenario.options["reference"])
        if reference.key in _IMAGES:
            theirs = _IMAGES[reference.key]
        else:  # measured in an earlier run (the store had it): generate its images again, once
            base = _build(reference, device)
            try:
                theirs = _quality_images(reference, base)[1]
            finally:
                _free(base)
        record["psnr_vs_reference"] = quality.psnr(theirs, np.nan_to_num(images))
    return record


def _costs_only(scenario: Scenario) -> bool:
    return scenario.repeats < 1


@measurer("unet_cost", pipeline=False, device_independent=_costs_only)
def _unet_cost(scenario: Scenario, pipe, device) -> dict:
    """One bare UNet evaluation: parameters and FLOPs (on "meta"); with repeats, its time on the device.

    ``options``: ``unet`` (a ``UNet2DConditionModel`` config) and ``side`` (the latent side); ``batch``
    is the UNet's batch (2 per image with guidance).
    """
    from labkit.models import as_dtype

    cost = unet_cost(
        scenario.options["unet"],
        side=scenario.options["side"],
        batch=scenario.batch,
        device=device,
        dtype=as_dtype(scenario.dtype),
        repeats=scenario.repeats,
        warmup=scenario.warmup,
    )
    return {"source": scenario.source, "status": "ok", "size": scenario.size, "dtype": scenario.dtype} | cost


@measurer("vae_cost", pipeline=False, device_independent=_costs_only)
def _vae_cost(scenario: Scenario, pipe, device) -> dict:
    """A VAE encoding or decoding one image: FLOPs (on "meta") and, with repeats, its time on the device.

    ``options``: ``vae`` (an ``AutoencoderKL`` config) and ``part`` (``"encode"`` or ``"decode"``).
    """
    from labkit.models import as_dtype

    cost = vae_cost(
        scenario.options["vae"],
        part=scenario.options["part"],
        size=scenario.size,
        device=device,
        dtype=as_dtype(scenario.dtype),
        repeats=scenario.repeats,
        warmup=scenario.warmup,
    )
    return {"source": scenario.source, "status": "ok", "size": scenario.size, "dtype": scenario.dtype} | cost


# ---------------------------------------------------------------------------------------------------
# Checking scenarios before any work
# ---------------------------------------------------------------------------------------------------


def check(scenario: Scenario) -> None:
    """Raise ``ValueError`` naming what is wrong with ``scenario`` and what is valid, before any work."""
    if scenario.kind not in MEASURERS:
        raise ValueError(f"unknown scenario kind {scenario.kind!r}{closest(scenario.kind, MEASURERS)}; known: "
                         + ", ".join(MEASURERS))  # fmt: skip
    scenario.steps_list()  # names and options of the optimizations
    source = scenario.source
    if source.startswith("twin:") and source.removeprefix("twin:") not in twin_names():
        raise ValueError(
            f"unknown twin {source!r}; choose one of: " + ", ".join(f"twin:{n}" for n in twin_names())
        )
    if source.startswith("shapes:") and source.removeprefix("shapes:") not in shapes_variants():
        raise ValueError(f"unknown shapes variant {source!r}; choose one of: "
                         + ", ".join(f"shapes:{n}" for n in shapes_variants()))  # fmt: skip
    for name, low in (("size", 8), ("steps", 1), ("batch", 1)):
        value = getattr(scenario, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")
    if scenario.size is not None and scenario.size % 8:
        raise ValueError(f"size must be a multiple of 8 (the VAE's downsampling), not {scenario.size}")
    if scenario.guidance is not None and not (
        isinstance(scenario.guidance, int | float) and 0 <= scenario.guidance < 1e4
    ):
        raise ValueError(f"guidance must be a number >= 0 (1 turns guidance off), not {scenario.guidance!r}")
    if scenario.repeats < 0 or scenario.warmup < 0 or scenario.n < 0:
        raise ValueError("repeats, warmup and n must be >= 0")
    if scenario.kind == "generate" and scenario.repeats < 1:
        raise ValueError(f"a generate scenario needs repeats >= 1, not {scenario.repeats}")
    if scenario.memory_cap_gb is not None and not scenario.memory_cap_gb > 0:
        raise ValueError(f"a memory cap is a positive number of GB, not {scenario.memory_cap_gb}")
    from labkit.models import DTYPES

    if scenario.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {scenario.dtype!r}; use one of {', '.join(sorted(DTYPES))}")


# ---------------------------------------------------------------------------------------------------
# Building pipelines
# ---------------------------------------------------------------------------------------------------


def _build_key(scenario: Scenario) -> str:
    """Scenarios with the same build share one pipeline: the same source, dtype and optimizations, where a
    sampler swap (which replaces the last one) does not count."""
    steps = scenario.steps_list()
    if not isinstance(steps, str):
        steps = [[n, o] for n, o in steps if OPTIMIZATIONS[n].stage != SAMPLER] + [
            any(OPTIMIZATIONS[n].stage == SAMPLER for n, _ in steps)
        ]
    return json.dumps([scenario.source, scenario.dtype, steps], sort_keys=True, default=str)


def _unavailable_before_loading(scenario: Scenario, device: torch.device) -> str | None:
    """Why a scenario cannot run here, from what its optimizations need (nothing is loaded)."""
    if scenario.memory_cap_gb is not None and (problem := cap_problem(scenario.memory_cap_gb, device)):
        return problem
    steps = scenario.steps_list()
    if isinstance(steps, str):
        steps = check_steps(steps)
    for name, options in steps:
        if (problem := step_problem(name, source=scenario.source, options=options)) is not None:
            return f"{name}: {problem}"
    return None


def _build(scenario: Scenario, device: torch.device):
    """Load the scenario's pipeline and apply its optimizations; unavailable steps are in the changes."""
    pipe = load_pipeline(scenario.source, device=device, dtype=scenario.dtype, seed=0)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unavailable steps are reported in the record instead
        apply(pipe, scenario.steps_list())
    return pipe


def _use_samplers(pipe, scenario: Scenario) -> None:
    """Apply only the scenario's sampler steps to a pipeline built for another sampler of its group."""
    steps = scenario.steps_list()
    if not isinstance(steps, str):
        sampler = [(n, o) for n, o in steps if OPTIMIZATIONS[n].stage == SAMPLER]
        if sampler:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # as in _build: a mismatch warning is in the record
                apply(pipe, sampler)


def _free(pipe) -> None:
    device = pipe._execution_device
    compiled = any(
        c.name == "torch_compile" and c.status == "applied" for c in getattr(pipe, "labkit_applied", [])
    )
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    del pipe
    if compiled:  # compiled code of one configuration must not count against the next
        torch._dynamo.reset()
    release_memory(device)


# ---------------------------------------------------------------------------------------------------
# measure()
# ---------------------------------------------------------------------------------------------------


def _finish(fields: dict, scenario: Scenario, fp: str, device: torch.device) -> dict:
    """A record: the measured ``fields``, stamped with the scenario, its key, the code fingerprint and
    the environment it was measured in."""
    record = {"kind": scenario.kind, "label": scenario.label, "source": scenario.source, "status": "ok"}
    record |= fields | scenario.notes  # the notes of the first scenario that measured it
    record |= {"kind": scenario.kind, "key": scenario.key, "fingerprint": fp}
    if scenario.kind == "generate":
        record.setdefault("size", scenario.size)
        record["memory_cap_gb"] = scenario.memory_cap_gb
        record.setdefault("measured_under_gb", scenario.memory_cap_gb)
    return record | environment(device) | {"scenario": scenario.setup()}


def _measure_one(scenario: Scenario, pipe, device: torch.device, fp: str) -> dict:
    """Measure one scenario on its built pipeline (None for kinds that build their own models)."""
    entry = MEASURERS[scenario.kind]
    if pipe is not None:
        missing = [c for c in pipe.labkit_applied if c.status != "applied"]
        if missing:  # an optimization asked for and not applied: nothing here would be what was asked
            reason = "; ".join(f"{c.name}: {c.what}" for c in missing)
            return _finish(describe(pipe) | {"status": "unavailable", "reason": reason}, scenario, fp, device)
    try:
        with contextlib.ExitStack() as stack:
            if scenario.memory_cap_gb is not None:
                stack.enter_context(memory_cap(scenario.memory_cap_gb, device))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
            fields = entry.fn(scenario, pipe, device)
    except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, AssertionError) as error:
        release_memory(device)
        fields = failure(error)
    if pipe is not None:
        fields = describe(pipe) | fields
    return _finish(fields, scenario, fp, device)


_SESSION: dict[tuple[str, str, str], dict] = {}
"""Records measured in this process without a store: a notebook opened by hand measures a setup once."""


def _relabel(record: dict, scenario: Scenario) -> dict:
    return {**copy.deepcopy(record), **scenario.notes, "label": scenario.label or record.get("label", "")}


def measure(
    scenarios: Scenario | Iterable[Scenario],
    store: str | Path | Store | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = print,
) -> list[dict]:
    """Measure the scenarios the store does not hold yet; return one record per scenario, in order.

    ``store`` is a records folder (`labkit.records.Store`); without one, records live for this process
    only. Every scenario is checked first (a bad one raises ``ValueError`` before any work), and the
    store is checked writable. A scenario whose optimization cannot run here gives an ``unavailable``
    record with the reason; out of memory gives ``oom``, NaN images ``nan``, any other failure
    ``error``, each with what was measured before. Each record is appended as soon as it exists.
    """
    scenarios = [scenarios] if isinstance(scenarios, Scenario) else list(scenarios)
    for scenario in scenarios:
        check(scenario)
    device = resolve_device(device)
    here = device_name(device)
    if store is not None and not isinstance(store, Store):
        store = Store(store)
    known: dict[tuple[str, str, str], dict] = dict(_SESSION) if store is None else {}
    if store is not None:
        store.check_writable()
        for record in store.records():
            if "key" in record and "fingerprint" in record:
                known[(record["key"], record["fingerprint"], record.get("device", ""))] = record

    def lookup(scenario: Scenario, fp: str) -> dict | None:
        if (hit := known.get((scenario.key, fp, here))) is not None:
            return hit
        if MEASURERS[scenario.kind].device_independent(scenario):
            return next((r for (k, f, _), r in known.items() if k == scenario.key and f == fp), None)
        return None

    fps = [code_fingerprint(*MEASURERS[s.kind].files) for s in scenarios]
    todo: dict[str, list[int]] = {}
    planned: set[str] = set()
    for i, (scenario, fp) in enumerate(zip(scenarios, fps, strict=True)):
        if lookup(scenario, fp) is None and scenario.key not in planned:
            planned.add(scenario.key)
            group = _build_key(scenario) if MEASURERS[scenario.kind].pipeline else f"-{i}"
            todo.setdefault(group, []).append(i)
    count, setups = len(planned), len({s.key for s in scenarios})
    if say is not None and count < setups:
        where = f"the store ({store.folder.name}/)" if store is not None else "this session"
        say(f"{setups - count} of {setups} setups already in {where}; measuring {count}")

    from tqdm.auto import tqdm

    # TQDM_DISABLE (the chapter runner sets it) holds for this bar too
    quiet = not progress or count == 0 or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    bar = tqdm(total=count, desc="measuring", unit="scenario", disable=quiet, file=sys.stderr)

    def keep(record: dict) -> None:
        entry = (record["key"], record["fingerprint"], record["device"])
        known[entry] = record
        if store is not None:
            store.append(record)
        else:
            _SESSION[entry] = record
        bar.update(1)

    try:
        for group in todo.values():
            # smaller caps first: a configuration that fitted under a cap fits under a larger one too
            group = sorted(group, key=lambda i: _cap_order(scenarios[i]))
            builds = MEASURERS[scenarios[group[0]].kind].pipeline
            pipe, fitted = None, {}
            try:
                for i in group:
                    scenario, fp = scenarios[i], fps[i]
                    bar.set_postfix_str(scenario.label[:40])
                    if builds and (why := _unavailable_before_loading(scenario, device)) is not None:
                        keep(_finish({"status": "unavailable", "reason": why}, scenario, fp, device))
                        continue
                    same = _uncapped_setup(scenario)
                    if same in fitted:
                        theirs = fitted[same]
                        copied = {**theirs, "measured_under_gb": theirs["memory_cap_gb"]}
                        keep(_finish(copied, scenario, fp, device))
                        continue
                    if builds and pipe is None:
                        try:
                            pipe = _build(scenario, device)
                        except (SourceError, OSError, RuntimeError) as error:
                            keep(_finish(failure(error), scenario, fp, device))
                            continue
                    elif builds:
                        _use_samplers(pipe, scenario)
                    record = _measure_one(scenario, pipe, device, fp)
                    keep(record)
                    if record["status"] == "ok" and scenario.memory_cap_gb is not None:
                        fitted[same] = record
            finally:
                if pipe is not None:
                    _free(pipe)
    finally:
        bar.close()
    out = []
    for scenario, fp in zip(scenarios, fps, strict=True):
        record = lookup(scenario, fp)
        if record is not None:  # None only when interrupted before it
            out.append(_relabel(record, scenario))
    return out


def _cap_order(scenario: Scenario) -> float:
    return float("inf") if scenario.memory_cap_gb is None else scenario.memory_cap_gb


def _uncapped_setup(scenario: Scenario) -> str:
    return json.dumps({**scenario.setup(), "memory_cap_gb": None}, sort_keys=True)


def grid(
    configs: dict[str, Sequence],
    *,
    source: str,
    dtype: str = "float32",
    sizes: Sequence[int | None] = (None,),
    caps: Sequence[float | None] = (None,),
    batches: Sequence[int] = (1,),
    **common,
) -> list[Scenario]:
    """``generate`` scenarios for each configuration (label -> optimizations) at each size, memory cap
    and batch: the sweeps of the memory, attention and compilation chapters. ``common`` sets the other
    `Scenario` fields (steps, repeats, warmup, breakdown, ...)."""
    return [
        Scenario(
            kind="generate",
            source=source,
            dtype=dtype,
            optimizations=tuple(spec),
            size=size,
            batch=batch,
            memory_cap_gb=cap,
            label=label,
            **common,
        )  # fmt: skip
        for label, spec in configs.items()
        for size in sizes
        for batch in batches
        for cap in caps
    ]


__all__ = ["MEASURERS", "Measurer", "RecordsError", "Scenario", "check", "grid", "measure", "measurer"]
