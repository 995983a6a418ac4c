"""Chapter 10 (the decision matrix): presets adapted to a profile, their scenarios, the matrix and its verdict."""

from __future__ import annotations

import dataclasses

import pytest

import labkit
from labkit import book
from labkit.chapters import ch10_decision_matrix as ch
from labkit.optimizations import PRESETS, step_problem

CI = book.get_profile("ci")
GPU = book.PROFILES["gpu"]  # its settings only: nothing here runs on a GPU


def test_use_cases_are_presets_and_quote_the_guide():
    assert list(ch.USE_CASES) == ["latency", "quality", "memory", "throughput"]
    for name, case in ch.USE_CASES.items():
        assert name in PRESETS
        assert case.question.endswith("?") and case.expected


def test_scale_steps_is_identity_on_gpu():
    assert book.scale_steps(20, GPU) == 20
    assert book.scale_steps(100, CI) == round(100 * CI.steps / 50)
    assert book.scale_steps(1, CI) >= 1


def test_adapt_records_every_change():
    plan = book.adapt_preset("latency", CI, "twin:tiny")
    names = [name for name, _ in plan.steps]
    assert "bf16" in names and "fp16" not in names  # ci's reduced precision
    assert dict(plan.steps)["dpm_solver"]["steps"] == book.scale_steps(20, CI)
    dropped = {c.name: c for c in plan.dropped}
    assert "torch_compile" in dropped and "compil" in dropped["torch_compile"].what  # ci has compile off
    assert all(c.status == "unavailable" for c in plan.dropped)
    assert any("bf16" in a for a in plan.adapted)
    # a step whose needs are missing here is dropped with the reason step_problem gives, never kept
    for name, _ in plan.steps:
        assert step_problem(name, source="twin:tiny") is None
    if step_problem("xformers") is not None:
        assert dropped["xformers"].what == step_problem("xformers")
    on_gpu = book.adapt_preset("latency", GPU, "twin:sd15")
    assert on_gpu.adapted == []
    kept = [n for n, _ in on_gpu.steps] + [c.name for c in on_gpu.dropped]
    assert sorted(kept) == sorted(n for n, _ in PRESETS["latency"].steps)  # nothing lost silently


def test_dropped_steps_are_listed_in_the_order_apply_runs_them():
    plan = book.adapt_preset("tier1+2+3", CI, "twin:tiny")
    text = plan.notes["unavailable"]
    assert text[0].startswith("swap_vae: UNAVAILABLE (")  # a twin ships no tuned VAE
    assert text[-1].startswith(
        "torch_compile(mode=reduce-overhead): UNAVAILABLE (profile ci has compilation off"
    )
    assert [c.name for c in book.adapt_preset("quality", CI, "shapes").dropped] == []  # shapes has its VAE


def test_adapt_scales_size_and_batch():
    assert book.adapt_preset("complete", CI).call["size"] == CI.large_size
    assert book.adapt_preset("throughput", CI).call["batch"] == max(CI.batch_sizes)
    assert book.adapt_preset("complete", GPU).call["size"] == 1024
    with pytest.raises(ValueError, match="unknown preset"):
        book.adapt_preset("nope", CI)


def test_speed_scenarios_ask_only_for_what_runs():
    scenarios = ch.speed_scenarios(CI)
    assert [s.label for s in scenarios] == ["latency", "quality", "memory", "throughput", "throughput"]
    assert [s.batch for s in scenarios if s.label == "throughput"] == list(CI.batch_sizes)
    assert all(s.memory_cap_gb is None for s in scenarios)  # ci caps no GPU memory
    latency = scenarios[0]
    assert [n for n, _ in latency.optimizations] == ["dpm_solver", "bf16", "sdpa"]
    assert latency.steps == book.scale_steps(20, CI) and latency.guidance == 7.5 and latency.size == CI.size
    assert latency.notes["preset"] == "latency" and latency.notes["unavailable"]
    assert scenarios[1].guidance == 12.0 and scenarios[1].steps == book.scale_steps(100, CI)
    assert [s.memory_cap_gb for s in ch.speed_scenarios(GPU) if s.label == "memory"] == [4.0, 6.0]


def test_quality_scenarios_use_the_presets_steps_guidance_and_batch():
    scores = {s.label: s for s in ch.quality_scenarios(CI)}
    assert all(
        s.kind == "quality" and s.source == CI.model and s.n == CI.quality_images for s in scores.values()
    )
    assert scores["quality"].guidance == 12.0 and scores["quality"].options == {}
    assert scores["latency"].options == {"chunk": 1}  # the latency preset's batch
    assert scores["throughput"].options == {"chunk": max(CI.batch_sizes)}
    assert "swap_vae" in [n for n, _ in scores["quality"].optimizations]


@pytest.mark.slow
def test_measured_presets_make_the_matrix():
    small = dataclasses.replace(CI, repeats=1, warmup=0)
    records = labkit.measure(ch.speed_scenarios(small), device="cpu", progress=False, say=None)
    assert [r["preset"] for r in records] == ["latency", "quality", "memory", *["throughput"] * 2]
    assert all(r["status"] == "ok" and r["s_per_image"] > 0 for r in records)
    assert "torch_compile" in " ".join(records[0]["unavailable"]) and records[0]["adapted"]
    assert [r["batch"] for r in records[3:]] == list(CI.batch_sizes)
    scores = [
        {"preset": p, "status": "ok", "prompt_accuracy": a}
        for p, a in [("latency", 0.5), ("quality", 0.9), ("memory", 0.7), ("throughput", 0.7)]
    ]
    table = ch.matrix_table(records, scores)
    assert list(table["preset"]) == list(ch.USE_CASES)
    assert table.loc[1, "prompt accuracy (shapes)"] == 0.9
    rows = ch.verdict_rows(records, scores)
    verdicts = {r["claim"].split(":")[0] + str(i): r["verdict"] for i, r in enumerate(rows)}
    assert verdicts["latency0"] == ch.NOT_MEASURABLE  # twin:tiny at 64 px is not SD 1.5 at 512
    assert verdicts["quality2"] == "holds"  # 0.9 is the best of the four
    assert verdicts["memory3"] == ch.NOT_MEASURABLE  # no GPU memory to cap
    assert verdicts["throughput4"] in ("holds", "does not hold")
    assert ch.best_throughput(records)["batch"] in CI.batch_sizes


def test_verdict_judges_comparable_records():
    fast = {"preset": "latency", "batch": 1, "status": "ok", "s_per_image": 0.5,
            "s_per_image_min": 0.5, "s_per_image_max": 0.5, "images_per_s": 2.0,
            "source": "twin:sd15", "size": 512}  # fmt: skip
    capped = {"preset": "memory", "batch": 1, "status": "ok", "memory_cap_gb": 4.0,
              "peak_allocated_gb": 2.5, "peak_reserved_gb": 3.0, "s_per_image": 2.0}  # fmt: skip
    oom = {"preset": "memory", "batch": 1, "status": "oom", "memory_cap_gb": 4.0}
    rows = ch.verdict_rows([fast, capped], [])
    assert rows[0]["verdict"] == "holds"
    assert rows[3]["verdict"] == "holds"
    assert ch.verdict_rows([oom], [])[3]["verdict"] == "does not hold"
    assert ch.verdict_rows([{**fast, "s_per_image": 2.0}], [])[0]["verdict"] == "above the claim"


def test_plan_table_lists_what_runs_and_what_was_dropped():
    table = book.plan_table(ch.plans(CI, CI.twin))
    assert list(table["preset"]) == list(ch.USE_CASES)
    assert "torch_compile" in table.loc[0, "dropped"] and "bf16" in table.loc[0, "optimizations"]
    assert table.loc[2, "adapted to the profile"] != "-"
