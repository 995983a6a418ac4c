"""labkit.decide (chapters 10 and 11): presets adapted to a profile, the matrix and the summary."""

from __future__ import annotations

import dataclasses

import pytest

import labkit
from labkit import decide, lab
from labkit.tiers import PRESETS

CI = lab.get_profile("ci")
GPU = lab.get_profile("gpu")


def test_use_cases_are_presets_and_quote_the_guide():
    assert list(decide.USE_CASES) == ["latency", "quality", "memory", "throughput"]
    for name, case in decide.USE_CASES.items():
        assert name in PRESETS
        assert case.question.endswith("?") and case.expected


def test_scale_steps_is_identity_on_gpu():
    assert decide.scale_steps(20, GPU) == 20
    assert decide.scale_steps(100, CI) == round(100 * CI.steps / 50)
    assert decide.scale_steps(1, CI) >= 1


def test_adapt_records_every_change():
    plan = decide.adapt("latency", CI)
    names = [name for name, _ in plan.steps]
    assert "bf16" in names and "fp16" not in names  # ci's reduced precision
    assert dict(plan.steps)["dpm_solver"]["steps"] == decide.scale_steps(20, CI)
    assert [c.name for c in plan.dropped] == ["torch_compile"]  # ci has compile off
    assert plan.dropped[0].status == "unavailable" and "compil" in plan.dropped[0].what
    assert any("bf16" in a for a in plan.adapted)
    on_gpu = decide.adapt("latency", GPU)
    assert on_gpu.adapted == [] and on_gpu.dropped == []
    assert on_gpu.steps == [(n, dict(o)) for n, o in PRESETS["latency"].steps]


def test_adapt_scales_size_and_batch():
    assert decide.adapt("complete", CI).call["size"] == CI.large_size
    assert decide.adapt("throughput", CI).call["batch"] == max(CI.batch_sizes)
    assert decide.adapt("complete", GPU).call["size"] == 1024
    with pytest.raises(ValueError, match="unknown preset"):
        decide.adapt("nope", CI)


def test_prepare_marks_unavailable_steps(tiny):
    changes = decide.prepare(tiny, "latency", CI)
    status = {c.name: c.status for c in changes}
    assert status["bf16"] == "applied" and status["torch_compile"] == "unavailable"
    assert tiny.labkit_preset == "latency"
    assert tiny.labkit_call["steps"] == decide.scale_steps(20, CI)
    assert any(c.name == "torch_compile" for c in tiny.labkit_applied)


def test_measure_preset_and_matrix(tiny):
    small = dataclasses.replace(CI, repeats=1, warmup=0)

    def load():
        return labkit.load_pipeline("twin:tiny", device="cpu")

    records = []
    for name in decide.USE_CASES:
        batches = small.batch_sizes if name == "throughput" else None
        records += decide.measure_preset(load, name, small, batches=batches)
    assert [r["preset"] for r in records] == ["latency", "quality", "memory", *["throughput"] * 2]
    assert all(r["status"] == "ok" and r["s_per_image"] > 0 for r in records)
    assert "torch_compile" in " ".join(records[0]["unavailable"])
    scores = [
        {"preset": p, "status": "ok", "prompt_accuracy": a}
        for p, a in [("latency", 0.5), ("quality", 0.9), ("memory", 0.7), ("throughput", 0.7)]
    ]
    table = decide.matrix_table(records, scores)
    assert list(table["preset"]) == list(decide.USE_CASES)
    assert table.loc[1, "prompt accuracy (shapes)"] == 0.9
    rows = decide.matrix_verdict(records, scores)
    verdicts = {r["claim"].split(":")[0] + str(i): r["verdict"] for i, r in enumerate(rows)}
    assert verdicts["latency0"] == decide.NOT_MEASURABLE  # twin:tiny at 64 px is not SD 1.5 at 512
    assert verdicts["quality2"] == "holds"  # 0.9 is the best of the four
    assert verdicts["memory3"] == decide.NOT_MEASURABLE  # no GPU memory to cap
    assert verdicts["throughput4"] in ("holds", "does not hold")


def test_matrix_verdict_judges_comparable_records():
    fast = {"preset": "latency", "batch": 1, "status": "ok", "s_per_image": 0.5,
            "s_per_image_min": 0.5, "s_per_image_max": 0.5, "images_per_s": 2.0,
            "source": "twin:sd15", "size": 512}  # fmt: skip
    capped = {"preset": "memory", "batch": 1, "status": "ok", "memory_cap_gb": 4.0,
              "peak_allocated_gb": 2.5, "peak_reserved_gb": 3.0, "s_per_image": 2.0}  # fmt: skip
    oom = {"preset": "memory", "batch": 1, "status": "oom", "memory_cap_gb": 4.0}
    rows = decide.matrix_verdict([fast, capped], [])
    assert rows[0]["verdict"] == "holds"
    assert rows[3]["verdict"] == "holds"
    assert decide.matrix_verdict([oom], [])[3]["verdict"] == "does not hold"
    assert decide.matrix_verdict([{**fast, "s_per_image": 2.0}], [])[0]["verdict"] == "above the claim"


def test_guide_stack_covers_the_complete_preset(tiny):
    mapped = {t for _, t in decide.GUIDE_STACK if not t.startswith("call:") and t != "load"}
    assert mapped == {name for name, _ in PRESETS["complete"].steps}
    calls = {t.removeprefix("call:") for _, t in decide.GUIDE_STACK if t.startswith("call:")}
    assert calls <= {"steps", "guidance", "size"}
    changes = decide.prepare(tiny, "complete", CI)
    table = decide.stack_table(tiny, changes)
    assert len(table) == len(decide.GUIDE_STACK)
    status = dict(zip(table["labkit step"], table["status on this device"], strict=True))
    assert status["model_cpu_offload()"].startswith("UNAVAILABLE")
    assert status["vae_tiling()"].startswith("applied")
    assert "bf16" in status["fp16()"]  # applied as the profile's reduced precision
    assert status["preset call setting size"] == f"applied: size = {CI.large_size}"


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
    rows = decide.summary_rows(records, scores, "twin:sd15")
    assert [r["speedup"] for r in rows] == [1.0, 5.0, 2.5, 10.0]
    assert rows[2]["quality_pct"] == pytest.approx(50)
    table = decide.summary_table(rows)
    assert list(table["speed (guide)"]) == ["1×", "15×", "25×", "40×"]
    assert table.loc[1, "speed (ours)"] == "5.00×"
    why = decide.why_different(rows)
    speed = {w["configuration"]: w["why"] for w in why if w["column"] == "speed"}
    assert "2.55×" in speed["Tier 1"]  # 51 -> 20 UNet calls
    assert "offload" in speed["Tier 1+2"]
    assert "distilled_student" in speed["Tier 1+2+3"]
    quality = [w for w in why if w["column"] == "quality"]
    assert [w["configuration"] for w in quality] == ["Tier 1+2"]
    memory = [w["configuration"] for w in why if w["column"] == "memory"]
    assert "Baseline" not in memory and "Tier 1+2" in memory  # 8 GB matches, 1.0 vs 1.5 does not


def test_every_profile_names_its_summary_twins():
    for profile in lab.PROFILES.values():
        assert isinstance(profile.summary_twins, tuple)
        for twin in profile.summary_twins:
            assert twin.startswith("twin:") and twin.removeprefix("twin:") in labkit.twin_names()
        assert isinstance(profile.as_dict()["summary_twins"], list)
