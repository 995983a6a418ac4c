"""Presets and `apply`: every preset applies or says why not, steps are checked before anything changes,
run in stage order, and the command-line syntax parses."""

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import labkit
from labkit.optimizations import (
    OPTIMIZATIONS,
    PRESETS,
    check_steps,
    parse_step,
    preset_problems,
    step_problem,
)


def processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


def test_presets_name_known_optimizations():
    assert {
        "baseline",
        "tier1",
        "tier1+2",
        "tier1+2+3",
        "latency",
        "quality",
        "memory",
        "throughput",
        "complete",
    } <= set(PRESETS)
    for preset in PRESETS.values():
        assert preset.description
        assert all(step in OPTIMIZATIONS for step, _ in preset.steps)


def test_baseline_preset(tiny):
    changes = labkit.apply(tiny, "baseline")
    assert all(c.status == "applied" for c in changes)
    assert type(tiny.scheduler).__name__ == "PNDMScheduler" and processors(tiny) == {AttnProcessor}
    assert tiny.unet.dtype == torch.float32
    assert tiny.labkit_call == {"steps": 50, "guidance": 7.5}
    assert [c.name for c in tiny.labkit_applied] == ["pndm", "classic_attention"]


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "baseline"])
def test_every_preset_applies_or_says_why_not(tiny, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        changes = labkit.apply(tiny, name)
    preset = PRESETS[name]
    assert [c.name for c in changes] == sorted(
        (s for s, _ in preset.steps), key=lambda s: OPTIMIZATIONS[s].stage
    )
    for change in changes:
        assert change.status in ("applied", "unavailable") and change.what
    applied = {c.name for c in changes if c.status == "applied"}
    if "fp16" in applied:
        assert tiny.unet.dtype == torch.float16
    if "dpm_solver" in applied:
        assert type(tiny.scheduler).__name__ == "DPMSolverMultistepScheduler"
    if "torch_compile" in applied:
        assert type(tiny.unet).__name__ == "OptimizedModule"
    for key, value in preset.call.items():
        assert tiny.labkit_call[key] == value
    if not torch.cuda.is_available() and "model_cpu_offload" in {s for s, _ in preset.steps}:
        assert "model_cpu_offload" not in applied


def test_apply_orders_compile_last_and_parses_options(tiny):
    changes = labkit.apply(tiny, ["torch_compile:mode=default", "fp16", ("dpm_solver", {"steps": 8})])
    assert [c.name for c in changes] == ["dpm_solver", "fp16", "torch_compile"]
    assert tiny.labkit_call["steps"] == 8
    with pytest.raises(ValueError, match="unknown optimization"):
        labkit.apply(tiny, ["fp64"])
    with pytest.raises(ValueError, match="unknown preset"):
        labkit.apply(tiny, "fastest")


def test_parse_step():
    assert parse_step("torch_compile:mode=reduce-overhead,fullgraph=true") == (
        "torch_compile",
        {"mode": "reduce-overhead", "fullgraph": True},
    )
    assert parse_step("dpm_solver:steps=20") == ("dpm_solver", {"steps": 20})


@pytest.mark.parametrize(
    "steps, message",
    [
        (["dpm_solve"], "unknown optimization 'dpm_solve' (did you mean 'dpm_solver'?)"),
        (["dpm_solver:steps=abc"], "expected int"),
        (["dpm_solver:steps=-3"], "steps must be >= 1"),
        (["torch_compile:mode="], "has no value"),
        (["torch_compile:mode=fast"], "choose one of 'default'"),
        (["fp16:foo=1"], "fp16 has no option 'foo'"),
        ([("sdpa", {"backend": "fastest"})], "choose one of 'flash'"),
        ([("attention_slicing", {"slice_size": 0})], "slice_size must be >= 1"),
    ],
)
def test_bad_steps_are_refused_before_anything_changes(tiny, steps, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        labkit.apply(tiny, steps)
    assert tiny.labkit_applied == [] and tiny.labkit_call == {}


def test_check_steps_accepts_every_form():
    assert check_steps(["fp16", "dpm_solver:steps=8", ("sdpa", {"backend": "math"})]) == [
        ("fp16", {}),
        ("dpm_solver", {"steps": 8}),
        ("sdpa", {"backend": "math"}),
    ]
    assert check_steps("baseline") == [("pndm", {"steps": 50}), ("classic_attention", {})]


def test_a_new_sampler_takes_the_place_of_the_last_in_the_record(tiny):
    labkit.apply(tiny, [("dpm_solver", {"steps": 3, "karras": True}), "fp16"])
    labkit.apply(tiny, ["dpm_solver:steps=5"])
    assert [c.name for c in tiny.labkit_applied] == ["dpm_solver", "fp16"]
    # every swap starts from the trained scheduler: the Karras sigmas of the first do not leak
    assert not tiny.scheduler.config.use_karras_sigmas
    assert tiny.labkit_call["steps"] == 5
    assert "PNDMScheduler (as trained)" in str(tiny.labkit_applied[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_step_problem_knows_sources_and_devices():
    assert "CUDA" in step_problem("model_cpu_offload")
    assert step_problem("fp16") is None
    assert "no tuned VAE" in step_problem("swap_vae", source="twin:sd15")
    assert step_problem("swap_vae", source="shapes") is None
    assert step_problem("distilled_student", source="twin:sd15") is None  # BK-SDM-Small's architecture
    assert "student" in step_problem("distilled_student", source="twin:tiny")
    assert "QAT" in step_problem("int8_qat", source="twin:sd15")
    assert any(p.startswith("swap_vae") for p in preset_problems("tier1", source="twin:sd15"))
    assert preset_problems("baseline", source="twin:sd15") == []
