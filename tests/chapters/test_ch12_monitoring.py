"""Chapter 12 (monitoring): the guide's snippet, the proper measurement as scenarios, and the regression check."""

from __future__ import annotations

import dataclasses

import pytest

import labkit
from labkit import book
from labkit.chapters import ch12_monitoring as ch
from labkit.cli import main
from labkit.scenarios import MEASURERS

CI = book.get_profile("ci")
SMALL = dataclasses.replace(CI, repeats=1, warmup=0, quality_images=2, fast_steps=1)


@pytest.fixture(scope="module")
def shapes():
    return labkit.load_pipeline("shapes", device="cpu")


def test_guide_monitor_reports_instead_of_crashing(shapes):
    out = ch.guide_monitor(shapes, num_inference_steps=1)
    assert out["generation_s"] > 0
    assert set(out) == {"generation_s", "memory_allocated_gb", "memory_reserved_gb", "fid_error"}


def test_scenarios_describe_one_setup_three_ways():
    naive = ch.guide_scenario(CI)
    timing, scores = ch.monitor_scenarios(CI)
    assert (naive.kind, timing.kind, scores.kind) == ("guide_monitor", "generate", "quality")
    assert naive.optimizations == timing.optimizations == scores.optimizations
    assert timing.steps == scores.steps == CI.fast_steps and scores.n == CI.quality_images
    assert timing.label == scores.label == ch.LABEL
    slow_timing, slow_scores = ch.slowed_scenarios(CI)
    assert slow_timing.kind == slow_scores.kind == "with_scheduler"
    assert slow_timing.options == {"scheduler": ch.SLOW_SCHEDULER, "measure": "generate"}
    assert slow_scores.options["measure"] == "quality" and slow_scores.n == scores.n
    assert MEASURERS["with_scheduler"].device_independent(slow_scores)
    assert not MEASURERS["with_scheduler"].device_independent(slow_timing)


def test_monitor_record_joins_time_and_quality():
    timing = {"label": "production", "status": "ok", "s_per_image": 1.0}
    scores = {"label": "production", "status": "ok", "prompt_accuracy": 0.5, "fid": 10.0, "n": 8}
    joined = ch.monitor_record(timing, scores)
    assert joined == timing | {"prompt_accuracy": 0.5, "fid": 10.0, "quality_images": 8}
    assert ch.monitor_record(timing, {"status": "error"}) == timing
    assert "prompt_accuracy" not in ch.monitor_record({**timing, "status": "oom"}, scores)


def test_with_scheduler_measures_under_another_sampler_and_gives_it_back(tiny):
    labkit.apply(tiny, [("dpm_solver", {"steps": 2})])
    scenario = labkit.Scenario(
        kind="with_scheduler", source="twin:tiny", optimizations=(("dpm_solver", {"steps": 2}),), steps=2,
        size=64, repeats=1, warmup=0, options={"scheduler": ch.SLOW_SCHEDULER, "measure": "generate"},
    )  # fmt: skip
    record = MEASURERS["with_scheduler"].fn(scenario, tiny, tiny.device)
    assert record["status"] == "ok" and record["scheduler"] == ch.SLOW_SCHEDULER
    assert record["denoiser_evaluations"] == 2 * 2 - 1  # Heun: two evaluations per step but the first
    assert type(tiny.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_verdict_rows():
    naive = {"generation_s": 2.0, "memory_allocated_gb": 0.0, "memory_reserved_gb": 0.0, "fid_error": "E: x"}
    proper = {"s_per_image": 1.0, "peak_allocated_gb": None}
    rows = ch.verdict_rows(naive, proper, 0, 1)
    assert [r["verdict"] for r in rows] == [
        "above the claim",  # twice the median
        "not measurable on this device",
        "does not run here",
        "holds",
        "holds",
    ]
    assert ch.verdict_rows(naive, proper, 1, 0)[3:] == [
        {**rows[3], "measured": "exit 1", "verdict": "does not hold"},
        {**rows[4], "measured": "exit 0", "verdict": "does not hold"},
    ]


@pytest.mark.slow
def test_measured_monitoring_and_the_regression_check(tmp_path, capsys):
    (naive,) = labkit.measure([ch.guide_scenario(SMALL)], device="cpu", progress=False, say=None)
    assert naive["status"] == "ok" and naive["generation_s"] > 0 and "fid_error" in naive
    proper = ch.monitor_record(*labkit.measure(ch.monitor_scenarios(SMALL), device="cpu", progress=False))
    slowed = ch.monitor_record(*labkit.measure(ch.slowed_scenarios(SMALL), device="cpu", progress=False))
    assert proper["quality_images"] == slowed["quality_images"] == 2
    assert proper["scheduler"] == "DPMSolverMultistepScheduler" and slowed["scheduler"] == ch.SLOW_SCHEDULER
    table = ch.monitor_table(naive, proper)
    assert list(table["quantity"])[0] == "generation time"
    base, new = tmp_path / "base.jsonl", tmp_path / "new.jsonl"
    labkit.append_records(base, proper)
    labkit.append_records(new, {**slowed, "s_per_image": 10 * proper["s_per_image"]})  # surely slower
    assert main(["compare", str(base), str(base)]) == 0
    assert main(["compare", str(base), str(new)]) == 1
    assert "slower beyond the tolerance" in capsys.readouterr().out
