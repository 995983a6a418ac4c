"""Chapter 7 (quantization): what torchao covers, the scenarios and their kinds, the verdict."""

import dataclasses
import importlib.util

import pytest

import labkit
from labkit.book import get_profile
from labkit.chapters import ch07_quantization as ch
from labkit.optimizations.quantize import coverage
from labkit.scenarios import check

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")

P = get_profile("ci")


def test_unet_coverage_of_a_twin_allocates_nothing_and_rejects_unknown_sources():
    c = ch.unet_coverage("twin:tiny")
    assert 0 < c["linear_share"] < 1
    assert c["max_saving_int8"] == pytest.approx(0.75 * c["linear_share"])
    with pytest.raises(ValueError, match="twin"):
        ch.unet_coverage("somewhere")


def test_unet_coverage_of_shapes_is_that_of_its_loaded_unet():
    pipe = labkit.load_pipeline("shapes")
    assert ch.unet_coverage("shapes") == coverage(pipe.unet)


def test_speed_scenarios_cover_each_scheme_on_each_dtype():
    scenarios = ch.speed_scenarios(P)
    for s in scenarios:
        check(s)
    assert len({s.key for s in scenarios}) == len(scenarios) == 2 * len(ch.SPEED_SCHEMES)
    half = [s for s in scenarios if s.notes["base_dtype"] == P.half_dtype]
    assert all(("bf16", {}) in s.steps_list() and s.dtype == "float32" for s in half)
    assert [s.notes["scheme"] for s in half] == ["none", "int8_weight_only", "int8_dynamic", "fp8_dynamic"]
    assert half[0].label == f"unquantized, {P.half_dtype}"


def test_quality_scenarios_compare_with_fp32_and_refuse_unknown_rows():
    scenarios = ch.quality_scenarios(P, list(ch.QUALITY_ROWS))
    by = {s.label: s for s in scenarios}
    reference = by["fp32"]
    assert "reference" not in reference.options
    for label, s in by.items():
        check(s)
        if label != "fp32":
            assert s.options["reference"] == reference.setup()
    assert ("int8_qat", {"scheme": "int8_int4"}) in by["int8_int4 + QAT"].steps_list()
    assert by["QAT weights, float"].kind == "qat_weights_quality"
    assert by["QAT weights, float"].steps_list() == reference.steps_list()
    with pytest.raises(ValueError, match="unknown quality row"):
        ch.quality_scenarios(P, ["int3"])


@needs_torchao
def test_quantized_generate_records_weight_bytes_and_coverage():
    tiny = dataclasses.replace(P, repeats=1, warmup=0)
    scenarios = ch.speed_scenarios(tiny, schemes=[None, "int8_dynamic", "fp8_dynamic"], dtypes=["float32"])
    plain, int8, fp8 = labkit.measure(scenarios, progress=False, say=None)
    assert plain["status"] == int8["status"] == "ok"
    assert int8["unet_weight_bytes"] < plain["unet_weight_bytes"]
    assert plain["linear_share"] == int8["linear_share"] == ch.unet_coverage("twin:tiny")["linear_share"]
    assert (int8["scheme"], int8["base_dtype"], int8["label"]) == (
        "int8_dynamic",
        "float32",
        "int8_dynamic, float32",
    )
    assert fp8["status"] == "unavailable" and fp8["reason"].startswith("fp8_dynamic: ")


@needs_torchao
@pytest.mark.slow
def test_qat_weights_in_float_are_scored_against_fp32():
    few = dataclasses.replace(P, quality_images=2)
    fp32, float_qat = labkit.measure(
        ch.quality_scenarios(few, ["fp32", "QAT weights, float"]), progress=False, say=None
    )
    assert float_qat["status"] == "ok" and float_qat["qat"] is True and float_qat["n"] == 2
    assert 20 < float_qat["psnr_vs_reference"] < 100  # the tuned weights move the pictures a little
    assert "psnr_vs_reference" not in fp32


def test_qat_info_reads_the_shipped_weights():
    info = ch.qat_info("int8_dynamic")
    assert info["scheme"] == "int8_dynamic" and info["steps"] > 0
    assert ch.qat_info("int3") == {}


def _speed(scheme, dtype, seconds, weight_bytes):
    return {
        "label": f"{scheme}, {dtype}",
        "scheme": scheme,
        "base_dtype": dtype,
        "status": "ok",
        "s_per_image": seconds,
        "unet_weight_bytes": weight_bytes,
        "peak_allocated_gb": None,
        "device": "CPU",
        "linear_share": 0.4,
        "max_saving_int8": 0.3,
    }


def _score(label, accuracy, n=100):
    return {"label": label, "status": "ok", "prompt_accuracy": accuracy, "fid": 20.0, "n": n,
            "psnr_vs_reference": 60.0}  # fmt: skip


def test_verdict_judges_memory_speed_and_whether_qat_recovers():
    speed = [
        _speed("none", "float32", 1.0, 400),
        _speed("int8_dynamic", "float32", 0.4, 280),
        _speed("none", P.half_dtype, 0.5, 200),
        _speed("int8_dynamic", P.half_dtype, 0.5, 170),
    ]
    same = [_score("fp32", 0.9), _score("int8_dynamic", 0.9), _score("int8_dynamic + QAT", 0.9)]
    rows = {r["claim"]: r["verdict"] for r in ch.verdict_rows(speed, same, P)}
    assert rows["INT8: 75% memory (UNet weights, against fp32)"] == "below the claim"
    assert rows["INT8: 2-3x speed (int8 dynamic against float32)"] == "holds"
    assert rows["INT8: 75% memory (peak during generation)"] == "not measured"
    assert rows["INT8 requires QAT (int8_dynamic)"].startswith("does not hold: PTQ loses nothing")
    assert rows["INT8: moderate quality loss (post-training, int8 dynamic)"].startswith("better")
    lossy = [_score("fp32", 0.9), _score("int8_dynamic", 0.6), _score("int8_dynamic + QAT", 0.88)]
    rows = {r["claim"]: r["verdict"] for r in ch.verdict_rows(speed, lossy, P)}
    assert rows["INT8 requires QAT (int8_dynamic)"].startswith("holds")
    assert rows["INT8: moderate quality loss (post-training, int8 dynamic)"] == "holds"
    harsh = [*lossy, _score("int8_int4", 0.5)]
    (row,) = [r for r in ch.verdict_rows(speed, harsh, P) if r["claim"].startswith("int4")]
    assert row["verdict"] == "not measured" and "labkit train qat --scheme int8_int4" in row["measured"]
