"""Chapter 3, numerics: its scenarios, the ``tf32`` kind that keeps TF32 to its own scenarios, its verdict.

All on the CPU with tiny models (twin:tiny, an untrained tiny shapes pipeline saved to a folder).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import labkit
from labkit.book import PROFILES
from labkit.chapters import ch03_numerics as ch
from labkit.scenarios import MEASURERS, Scenario, measurer

VERDICTS = {"holds", "below the claim", "above the claim", "not measured", "does not hold (NaN images)"}


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """A folder holding an untrained tiny shapes pipeline (same structure as the shipped model)."""
    from labkit.shapes.build import ModelConfig, build_pipeline
    from labkit.shapes.tokenizer import fit_tokenizer

    folder = tmp_path_factory.mktemp("tiny-shapes")
    torch.manual_seed(0)
    pipe = build_pipeline(ModelConfig.tiny(), folder / "tok")
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    fit_tokenizer(folder / "model" / "tokenizer")
    return folder / "model"


def _profile(**changes):
    base = {"size": 32, "fast_steps": 1, "batch_sizes": (1, 2), "repeats": 1, "warmup": 0}
    return dataclasses.replace(PROFILES["ci"], **(base | changes))


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_scenarios_are_one_per_format_and_batch():
    P = _profile()
    speed = ch.speed_scenarios(P)
    assert [s.label for s in speed] == [f"{p}, batch {b}" for p in ch.PRECISIONS for b in (1, 2)]
    tf32 = [s for s in speed if s.notes["precision"] == "tf32"]
    assert all(s.kind == "tf32" and s.options == {"of": "generate"} for s in tf32)
    assert all(s.kind == "generate" and not s.flops for s in speed if s not in tf32)  # no FLOPs on a CPU
    assert all(s.steps == 1 and s.optimizations[0] == ("dpm_solver", {"steps": 1}) for s in speed)
    breakdown = ch.breakdown_scenarios(P)
    assert [s.label for s in breakdown] == [
        "fp32, batch 1",
        "fp32, batch 2",
        "bf16, batch 1",
        "bf16, batch 2",
    ]
    assert all(s.breakdown for s in breakdown)
    scores = ch.quality_scenarios(P)
    reference = scores[0].options["reference"]
    assert all(s.options["reference"] == reference for s in scores)
    assert Scenario(**reference).key != scores[0].key  # the fp32 row is measured against its own setup
    assert scores[1].kind == "tf32" and scores[1].options["of"] == "quality"


def test_the_tf32_kind_keeps_the_switch_to_its_own_scenario(monkeypatch):
    seen = {}

    @measurer("_probe", pipeline=False)
    def probe(scenario, pipe, device):
        seen["flags"] = _flags()
        return {"status": "ok"}

    try:
        before = _flags()
        monkeypatch.setattr(ch, "_PROCESS_TF32", before)
        scenario = Scenario(kind="tf32", options={"of": "_probe"})
        assert MEASURERS["tf32"].fn(scenario, None, torch.device("cpu")) == {"status": "ok"}
        assert seen["flags"] == (True, True)  # on while it runs, even if an earlier scenario put it back
        assert _flags() == before
        assert MEASURERS["tf32"].device_independent(scenario) is False
    finally:
        MEASURERS.pop("_probe")


def test_a_tf32_quality_row_is_compared_with_a_true_fp32_reference(monkeypatch):
    seen = []

    def fake_quality(scenario, pipe, device):
        seen.append((scenario.key, _flags()))
        return {"status": "ok"}

    real = MEASURERS["quality"]
    monkeypatch.setitem(MEASURERS, "quality", dataclasses.replace(real, fn=fake_quality))
    monkeypatch.setattr(ch, "_PROCESS_TF32", (False, False))
    P = _profile(model="twin:tiny")  # a quick pipeline to build the reference from
    (tf32,) = ch.quality_scenarios(P, ("tf32",))
    before = _flags()
    try:
        MEASURERS["tf32"].fn(tf32, None, torch.device("cpu"))
    finally:
        ch._set_tf32_flags(before)
    reference = Scenario(**tf32.options["reference"])
    assert reference.optimizations == [["dpm_solver", {"steps": 1}]]  # fp32
    assert seen == [(reference.key, (False, False)), (tf32.key, (True, True))]  # the reference first
    assert MEASURERS["tf32"].device_independent(tf32) is True  # as quality on shapes


@pytest.mark.slow
def test_speed_reports_unavailable_and_leaves_tf32_alone(tmp_path):
    flags = _flags()
    records = labkit.measure(
        ch.speed_scenarios(_profile(), ("fp32", "tf32", "bf16")), tmp_path, progress=False, say=None
    )
    assert _flags() == flags
    by = {r["label"]: r for r in records}
    if not torch.cuda.is_available():
        assert by["tf32, batch 1"]["status"] == "unavailable" and "CUDA" in by["tf32, batch 1"]["reason"]
        assert by["fp32, batch 1"]["tf32_matmul"] is None
    assert by["fp32, batch 2"]["status"] == "ok" and by["bf16, batch 1"]["dtype"] == "bfloat16"
    assert by["bf16, batch 2"]["precision"] == "bf16" and by["bf16, batch 2"]["batch"] == 2
    assert "flops_per_image" not in by["fp32, batch 1"]  # FLOPs are counted on a GPU only


@pytest.mark.slow
def test_quality_and_where_time_goes(tiny_shapes, tmp_path):
    P = _profile(model=str(tiny_shapes), quality_images=2)
    records = labkit.measure(
        ch.quality_scenarios(P, ("fp32", "tf32", "bf16")), tmp_path, progress=False, say=None
    )
    by = {r["precision"]: r for r in records}
    assert by["fp32"]["psnr_vs_reference"] == 100.0
    assert by["bf16"]["status"] == "ok" and by["bf16"]["psnr_vs_reference"] < 100
    if not torch.cuda.is_available():
        assert by["tf32"]["status"] == "unavailable"
    breakdown = labkit.measure(ch.breakdown_scenarios(P)[:2], tmp_path, progress=False, say=None)
    assert [r["label"] for r in breakdown] == ["fp32, batch 1", "fp32, batch 2"]
    assert all(r["unet_s"] > 0 for r in breakdown)
    if not torch.cuda.is_available():
        assert breakdown[0]["busy_share"] is None


def test_verdict_from_records():
    P = PROFILES["gpu"]

    def rec(precision, batch, seconds, memory):
        return {"precision": precision, "batch": batch, "s_per_image": seconds,
                "peak_allocated_gb": memory, "status": "ok", "device": "d"}  # fmt: skip

    speed = [rec("fp32", 1, 1.0, 6.0), rec("fp32", 16, 1.0, 20.0), rec("fp16", 1, 0.9, 3.0)]
    speed += [rec("fp16", 16, 0.5, 10.0), rec("bf16", 1, 0.9, 3.0), rec("bf16", 16, 0.5, 10.0)]
    scores = [
        {
            "precision": p,
            "prompt_accuracy": 0.8,
            "fid": 20.0,
            "psnr_vs_reference": psnr,
            "n": 256,
            "nan_images": nan,
        }
        for p, psnr, nan in (("fp32", 100.0, 0), ("fp16", 35.0, 0), ("bf16", 30.0, 3))
    ]
    rows = ch.verdict_rows(speed, scores, P)
    by = {r["claim"]: r["verdict"] for r in rows}
    assert by["FP16: 50% memory"] == "holds"
    assert by["FP16: 1.5-2x speed (batch 1)"] == "below the claim"
    assert by["FP16: 1.5-2x speed (batch 16)"] == "holds"
    assert by["FP16: negligible quality loss"] == "holds"
    assert (
        by["bf16 instead of FP16 (not in the guide): negligible quality loss"] == "does not hold (NaN images)"
    )
    assert all(r["verdict"] in VERDICTS for r in rows)
