"""Chapter 11 (the complete stack): the guide's stack line by line, the summary's scenarios, rows and reasons."""

from __future__ import annotations

import warnings

import pytest

import labkit
from labkit import book
from labkit.chapters import ch11_complete_stack as ch
from labkit.optimizations import PRESETS

CI = book.get_profile("ci")
GPU = book.PROFILES["gpu"]  # its settings only: nothing here runs on a GPU


def test_guide_stack_covers_the_complete_preset(tiny):
    mapped = {t for _, t in ch.GUIDE_STACK if not t.startswith("call:") and t != "load"}
    assert mapped == {name for name, _ in PRESETS["complete"].steps}
    calls = {t.removeprefix("call:") for _, t in ch.GUIDE_STACK if t.startswith("call:")}
    assert calls <= {"steps", "guidance", "size"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unavailable steps are in the table
        changes = labkit.apply(tiny, "complete")
    table = ch.stack_table(tiny, changes)
    assert len(table) == len(ch.GUIDE_STACK)
    status = dict(zip(table["labkit step"], table["status on this device"], strict=True))
    assert status["vae_tiling()"].startswith("applied")
    assert status["swap_vae()"].startswith("UNAVAILABLE")  # a twin ships no tuned VAE
    assert status["preset call setting size"] == "applied: size = 1024"


def test_stack_table_of_the_adapted_plan_names_the_profiles_precision(tiny):
    plan = book.adapt_preset("complete", CI, "twin:tiny")
    changes = labkit.apply(tiny, plan.steps) + plan.dropped
    table = ch.stack_table(tiny, changes)
    status = dict(zip(table["labkit step"], table["status on this device"], strict=True))
    assert "bf16" in status["fp16()"]  # applied as the profile's reduced precision
    assert status["torch_compile(mode=reduce-overhead)"].startswith("UNAVAILABLE")
    assert status["model_cpu_offload()"].startswith("UNAVAILABLE")


def test_complete_scenario_runs_at_the_large_size():
    scenario = ch.complete_scenario(CI)
    assert scenario.size == CI.large_size and scenario.steps == book.scale_steps(20, CI)
    assert scenario.label == "complete" and scenario.notes["preset"] == "complete"
    assert "size 1024 -> 128 (P.large_size)" in scenario.notes["adapted"]
    assert "torch_compile" not in [n for n, _ in scenario.optimizations]


def test_summary_scenarios_cover_each_twin():
    scenarios = ch.summary_scenarios(CI)
    assert [s.label for s in scenarios] == [g.preset for g in ch.GUIDE_SUMMARY]
    assert {s.source for s in scenarios} == {CI.twin} and {s.size for s in scenarios} == {CI.size}
    on_gpu = ch.summary_scenarios(GPU)
    assert len(on_gpu) == 4 * (1 + len(GPU.summary_twins))
    assert all(s.size is None for s in on_gpu if s.source in GPU.summary_twins)  # at the twin's own size
    scores = ch.quality_scenarios(CI)
    assert [s.kind for s in scores] == ["quality"] * 4 and {s.source for s in scores} == {CI.model}


def _speed(preset, s, gb=None, evals=10, unavailable=(), applied=()):
    return {"preset": preset, "source": "twin:sd15", "size": 512, "status": "ok",
            "s_per_image": s, "s_per_image_min": s, "s_per_image_max": s,
            "peak_allocated_gb": gb, "denoiser_evaluations": evals, "device": "NVIDIA H100",
            "unavailable": list(unavailable), "applied": list(applied)}  # fmt: skip


def test_summary_rows_table_and_reasons():
    records = [
        _speed("baseline", 10.0, 8.0, evals=51),
        _speed("tier1", 2.0, 2.0, evals=20),
        _speed("tier1+2", 4.0, 1.0, evals=20, applied=["model_cpu_offload: ..."]),
        _speed("tier1+2+3", 1.0, 1.0, evals=20, unavailable=["distilled_student: UNAVAILABLE (x)"]),
    ]
    scores = [
        {"preset": p, "status": "ok", "prompt_accuracy": a, "unavailable": []}
        for p, a in [("baseline", 1.0), ("tier1", 0.98), ("tier1+2", 0.5), ("tier1+2+3", 0.95)]
    ]
    rows = ch.summary_rows(records, scores, "twin:sd15")
    assert [r["speedup"] for r in rows] == [1.0, 5.0, 2.5, 10.0]
    assert rows[2]["quality_pct"] == pytest.approx(50)
    table = ch.summary_table(rows)
    assert list(table["speed (guide)"]) == ["1×", "15×", "25×", "40×"]
    assert table.loc[1, "speed (ours)"] == "5.00×"
    why = ch.why_different(rows)
    speed = {w["configuration"]: w["why"] for w in why if w["column"] == "speed"}
    assert "2.55×" in speed["Tier 1"]  # 51 -> 20 UNet calls
    assert "offload" in speed["Tier 1+2"]
    assert "distilled_student" in speed["Tier 1+2+3"]
    quality = [w for w in why if w["column"] == "quality"]
    assert [w["configuration"] for w in quality] == ["Tier 1+2"]
    memory = [w["configuration"] for w in why if w["column"] == "memory"]
    assert "Baseline" not in memory and "Tier 1+2" in memory  # 8 GB matches, 1.0 vs 1.5 does not
    verdicts = {r["claim"]: r["verdict"] for r in ch.verdict_rows(rows)}
    assert verdicts["Tier 1: speed vs baseline"] == "below the claim"  # 5x, not 15x
    assert verdicts["Tier 1: quality vs baseline (prompt accuracy on shapes)"] == "holds"


def test_verdict_is_not_measurable_off_the_guides_setup():
    records = [{**_speed(p, s), "source": "twin:tiny", "size": 64} for p, s in
               [("baseline", 2.0), ("tier1", 1.0), ("tier1+2", 1.0), ("tier1+2+3", 1.0)]]  # fmt: skip
    rows = ch.summary_rows(records, [], "twin:tiny")
    speed = [r for r in ch.verdict_rows(rows) if "speed" in r["claim"]]
    assert {r["verdict"] for r in speed} == {ch.NOT_MEASURABLE}
    assert "not SD 1.5 at 512 px" in speed[0]["measured"]


def test_every_profile_names_its_summary_twins():
    for profile in book.PROFILES.values():
        assert isinstance(profile.summary_twins, tuple)
        for twin in profile.summary_twins:
            assert twin.startswith("twin:") and twin.removeprefix("twin:") in labkit.twin_names()
        assert isinstance(profile.as_dict()["summary_twins"], list)
