"""Chapter 6, compilation: torch.compile's modes, the price of the warm-up, and recompilation on new shapes.

- `tier1`, `COMPILED`, `compile_off`: what every configuration starts from, the compiled (and layout)
  configurations, and why a profile runs none of the compiled ones (``P.compile`` is False);
- `eager_scenarios`: the eager pipeline at batch 1 and at a larger batch, with a time breakdown;
  `compiled_scenarios`: each of `COMPILED`, a configuration the profile switches off becoming an
  ``unavailable`` record with the reason (kind ``switched_off``);
- `compile_table`: compile time, steady-state time, speed-up and break-even images; `cuda_graph_lines`:
  what CUDA graphs add at batch 1;
- `compile_piece`, `recompilations` and `recompilation_scenarios` (kind ``recompilation``): the graphs
  torch.compile builds as the image size or the batch changes;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Sequence

import torch

from labkit.book import Profile, find, judge, note
from labkit.devices import release_memory
from labkit.measurement import break_even_images, compile_seconds, timed
from labkit.models import load_pipeline, unet_inputs
from labkit.scenarios import Scenario, grid, measurer

REFERENCE = "tier 1, eager"
"""The label of the uncompiled pipeline every compiled one is compared with."""

COMPILED: dict[str, list] = {
    "compile default": [("torch_compile", {"mode": "default"})],
    "compile reduce-overhead": [("torch_compile", {"mode": "reduce-overhead"})],
    "regional compile, default": [("torch_compile", {"regional": True})],
    "regional compile, max-autotune-no-cudagraphs": [
        ("torch_compile", {"mode": "max-autotune-no-cudagraphs", "regional": True})
    ],
    "fused QKV + channels_last, eager": ["fuse_qkv", "channels_last"],
}
"""The configurations of the compile section: label -> optimizations on top of `tier1`."""

SETTINGS: dict[str, dict] = {
    "default (dynamic=None)": {},
    "dynamic=True": {"dynamic": True},
    "regional (repeated blocks)": {"regional": True},
}
"""The compile settings the recompilation section compares: label -> ``torch.compile`` options
(``regional``: compile only the repeated blocks)."""

SWITCHED_OFF = "switched_off"
"""The kind of a scenario the profile switches off: its record is ``unavailable``, with the reason."""


def tier1(P: Profile) -> list:
    """What every configuration starts from (loaded in ``P.half_dtype``): DPM-Solver++ and SDPA."""
    return [("dpm_solver", {"steps": P.fast_steps}), "sdpa"]


def compiles(spec: Sequence) -> bool:
    """Whether a list of optimizations compiles the UNet (holds a ``torch_compile`` step)."""
    return any(isinstance(step, tuple | list) and step[0] == "torch_compile" for step in spec)


def compile_off(P: Profile) -> str | None:
    """Why profile ``P`` runs no compiled configuration, or None when it compiles (``P.compile``)."""
    if P.compile:
        return None
    return (
        f"profile {P.name} has compile=False: compiling even the tiny UNet takes minutes on "
        "this kind of machine; run the gpu profile to measure it"
    )


def _generate(P: Profile, configurations: dict[str, list], **settings) -> list[Scenario]:
    return grid(
        configurations,
        source=P.twin,
        dtype=P.half_dtype,
        sizes=[P.size],
        steps=P.fast_steps,
        repeats=P.repeats,
        warmup=P.warmup,
        **settings,
    )


def eager_scenarios(P: Profile) -> list[Scenario]:
    """The eager tier 1 pipeline at batch 1 (`REFERENCE`) and at ``P.batch_sizes[1]``, with the time
    breakdown (how busy the GPU is)."""
    big = P.batch_sizes[1]
    return _generate(P, {REFERENCE: tier1(P)}, breakdown=True) + _generate(
        P, {f"{REFERENCE}, batch {big}": tier1(P)}, batches=[big], breakdown=True
    )


def compiled_scenarios(P: Profile) -> list[Scenario]:
    """Each of `COMPILED` at ``P.size``, batch 1; a compiled one on a profile that does not compile is
    the same setup of kind ``switched_off`` (its record says why, nothing runs)."""
    why = compile_off(P)
    out = []
    for scenario in _generate(P, {label: tier1(P) + spec for label, spec in COMPILED.items()}):
        if why is not None and compiles(COMPILED[scenario.label]):
            scenario = scenario.but(kind=SWITCHED_OFF, options={"reason": why})
        out.append(scenario)
    return out


@measurer(SWITCHED_OFF, pipeline=False)
def _switched_off(scenario: Scenario, pipe, device) -> dict:
    """A setup the profile switches off: nothing runs; ``unavailable``, with ``options["reason"]``."""
    return {"status": "unavailable", "reason": scenario.options["reason"], "size": scenario.size}


# ---------------------------------------------------------------------------------------------------
# Compile cost and CUDA graphs
# ---------------------------------------------------------------------------------------------------


def compile_table(records: Sequence[dict], reference: str = REFERENCE):
    """Compile time, steady-state time, speed-up and break-even images against ``reference``.

    ``compile s`` is `labkit.measurement.compile_seconds` (the warm-up beyond a steady call);
    ``break-even images`` is `labkit.measurement.break_even_images`.
    """
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
                "note": note(r),
            }
        )
    return pd.DataFrame(rows)


def cuda_graph_lines(records: Sequence[dict]) -> list[str]:
    """What CUDA graphs add at batch 1: ``compile reduce-overhead`` against ``compile default``, and the
    eager GPU's idle share (`REFERENCE`'s ``busy_share``) they remove."""
    default = find(records, label="compile default")
    graphs = find(records, label="compile reduce-overhead")
    if default["status"] != "ok" or graphs["status"] != "ok":
        return [
            f"not measured here: compile default is {default['status']}, reduce-overhead {graphs['status']}"
        ]
    gain = default["s_per_image"] / graphs["s_per_image"]
    lines = [f"CUDA graphs, at batch 1: {gain:.2f}x faster than the same compiled UNet without them"]
    eager = find(records, label=REFERENCE)
    if eager is not None and eager.get("busy_share") is not None:
        lines.append(
            f"the eager GPU was idle {1 - eager['busy_share']:.0%} of the time: that is what they remove"
        )
    return lines


# ---------------------------------------------------------------------------------------------------
# Recompilation
# ---------------------------------------------------------------------------------------------------


def _block_inputs(unet, block, size: int, batch: int = 1, *, vae_scale_factor: int = 8):
    side = size // vae_scale_factor
    options = {"device": unet.device, "dtype": unet.dtype}
    hidden = torch.randn(2 * batch, side * side, block.norm1.normalized_shape[0], **options)
    context = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, **options)
    return (hidden,), {"encoder_hidden_states": context}


def _unet_call(unet, size: int, batch: int = 1, *, vae_scale_factor: int = 8):
    # with classifier-free guidance a pipeline calls the UNet on twice its images
    return (), unet_inputs(unet, side=size // vae_scale_factor, batch=2 * batch)


def compile_piece(
    unet, piece: str = "unet", *, vae_scale_factor: int = 8
) -> tuple[torch.nn.Module, Callable]:
    """What recompilations are counted on: ``(module, make_inputs)``, ``make_inputs(size, batch)``
    returning ``(args, kwargs)`` for ``batch`` images at ``size`` px (twice the rows, for guidance).

    ``piece="unet"``: the whole UNet (`labkit.models.unet_inputs`). ``piece="block"``: only its first
    transformer block (the small piece the ``ci`` profile traces: seconds instead of a minute), with
    hidden states of the tokens of the UNet's first level.
    """
    if piece == "unet":
        return unet, functools.partial(_unet_call, unet, vae_scale_factor=vae_scale_factor)
    if piece == "block":
        block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
        return block, functools.partial(_block_inputs, unet, block, vae_scale_factor=vae_scale_factor)
    raise ValueError(f"unknown piece {piece!r}: 'unet' or 'block'")


def recompilations(
    module, make_inputs: Callable, shapes: Sequence[tuple[int, int]], options: dict, *, backend: str = "eager"
) -> list[dict]:
    """Count the graphs torch.compile builds as the input shape changes, for one setting.

    A copy of ``module`` is compiled with ``options`` (``torch.compile``'s; ``regional=True`` compiles
    only the repeated blocks, ``compile_repeated_blocks``) and called on each ``(size, batch)`` of
    ``shapes`` in turn (``make_inputs(size, batch)`` returns ``(args, kwargs)``), each twice. One dict
    per shape: how many new graphs Dynamo captured (its counters), the first call's time and the
    second's: the difference is the price of the new graphs. The counts are Dynamo's (its guards decide
    when to recompile), the same with every backend; ``backend="eager"`` skips code generation, so the
    times hold the tracing only.
    """
    import warnings

    from torch._dynamo.utils import counters

    device = next(module.parameters()).device
    options = dict(options)
    regional = options.pop("regional", False)
    torch._dynamo.reset()
    counters.clear()
    compiled = copy.deepcopy(module)
    if regional:
        compiled.compile_repeated_blocks(backend=backend, **options)
    else:
        compiled = torch.compile(compiled, backend=backend, **options)
    out, before = [], 0
    for size, batch in shapes:
        args, kwargs = make_inputs(size, batch)
        times = []
        with torch.inference_mode(), warnings.catch_warnings():
            # Dynamo's note on diffusers' cached version checks is harmless and would fill the chapter
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
            for _ in range(2):
                times.append(timed(functools.partial(compiled, *args, **kwargs), device)[0])
        graphs = counters["stats"]["unique_graphs"]
        out.append(
            {
                "status": "ok",
                "backend": backend,
                "module": type(module).__name__,
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
    return out


def recompilation_scenarios(P: Profile) -> list[Scenario]:
    """Each of `SETTINGS` at ``P.size``, ``P.large_size``, then ``P.size`` at ``P.batch_sizes[1]``, in that
    order: one ``recompilation`` scenario per setting and shape.

    A profile that does not compile counts on the UNet's first transformer block (a second to trace,
    where the whole UNet takes a minute on a CPU), without the regional setting (it needs the whole UNet).
    """
    shapes = [[P.size, 1], [P.large_size, 1], [P.size, P.batch_sizes[1]]]
    piece = "unet" if P.compile else "block"
    settings = {k: v for k, v in SETTINGS.items() if P.compile or not v.get("regional")}
    return [
        Scenario(
            kind="recompilation",
            source=P.twin,
            dtype=P.half_dtype,
            size=size,
            batch=batch,
            options={
                "piece": piece,
                "compile": dict(options),
                "backend": "eager",
                "shapes": shapes,
                "index": i,
            },
            label=label,
        )
        for label, options in settings.items()
        for i, (size, batch) in enumerate(shapes)
    ]


# the per-shape results of the runs measured in this process: the scenario of a later shape of the
# same run takes its result from the run its first shape made, as the shapes were called in turn
_RUNS: dict[str, list[dict]] = {}


@measurer("recompilation", pipeline=False)
def _recompilation(scenario: Scenario, pipe, device) -> dict:
    """The graphs compiled at shape ``options["index"]`` of ``options["shapes"]`` (called in that order).

    ``options``: ``piece`` (`compile_piece`), ``compile`` (the setting's options), ``backend``,
    ``shapes`` (``[size, batch]`` pairs) and ``index``; ``size`` and ``batch`` are the shape at ``index``.
    """
    o = scenario.options
    size, batch = o["shapes"][o["index"]]
    if (size, batch) != (scenario.size, scenario.batch):
        raise ValueError(f"size and batch ({scenario.size}, {scenario.batch}) are not shape {o['index']}")
    run = json.dumps([scenario.source, scenario.dtype, scenario.seed, str(device), {**o, "index": None}])
    if run not in _RUNS:
        loaded = load_pipeline(scenario.source, device=device, dtype=scenario.dtype, seed=scenario.seed)
        module, make_inputs = compile_piece(loaded.unet, o["piece"], vae_scale_factor=loaded.vae_scale_factor)
        shapes = [tuple(s) for s in o["shapes"]]
        results = recompilations(module, make_inputs, shapes, o["compile"], backend=o["backend"])
        del loaded, module, make_inputs
        release_memory(device)
        while len(_RUNS) >= 4:
            _RUNS.pop(next(iter(_RUNS)))
        _RUNS[run] = results
    return dict(_RUNS[run][o["index"]])


# ---------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------


def _speed_row(records: Sequence[dict], reference: dict, label: str, name: str) -> dict:
    r = find(records, label=label)
    row = {"claim": f"{name}: 20-30% additional speed-up", "claimed": "+20-30%"}
    if r["status"] != "ok":
        return row | {"measured": r.get("reason") or r["status"], "verdict": "not measured"}
    gain = 100 * (reference["s_per_image"] / r["s_per_image"] - 1)
    measured = f"{gain:+.0f}% ({reference['s_per_image']:.3g} -> {r['s_per_image']:.3g} s/image)"
    return row | {"measured": measured, "verdict": judge(gain, 20, 30)}


def _warmup_row(records: Sequence[dict], reference: dict, label: str) -> dict:
    r = find(records, label=label)
    row = {"claim": "the speed-up comes after a warm-up", "claimed": "a one-off warm-up"}
    if r["status"] != "ok":
        return row | {"measured": r.get("reason") or r["status"], "verdict": "not measured"}
    n = break_even_images(reference, r)
    cost = compile_seconds(r)
    if n == float("inf"):
        return row | {"measured": f"warm-up {cost:.0f} s, no gain", "verdict": "does not hold"}
    return row | {"measured": f"warm-up {cost:.0f} s; paid back after {n:.0f} images", "verdict": "holds"}


def verdict_rows(records: Sequence[dict]) -> list[dict]:
    """The rows of the chapter's verdict, from the `REFERENCE` record and those of `compiled_scenarios`:
    the guide's "20-30% additional speed-up after warmup" for reduce-overhead and default mode."""
    reference = find(records, label=REFERENCE)
    if reference is None:
        raise ValueError(f"no {REFERENCE!r} record among the records")
    return [
        _speed_row(
            records, reference, "compile reduce-overhead", "torch.compile reduce-overhead (the guide's line)"
        ),
        _speed_row(records, reference, "compile default", "torch.compile default mode"),
        _warmup_row(records, reference, "compile reduce-overhead"),
    ]
