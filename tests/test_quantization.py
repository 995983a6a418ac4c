"""The INT8 chapter's helpers: what torchao covers, QAT's fakes match PTQ, the QAT variant, the verdict."""

import copy
import importlib.util
import json
import warnings

import pytest
import torch

import labkit
from labkit import quantization as Q
from labkit import tiers
from labkit.lab import get_profile
from labkit.shapes import qat
from labkit.shapes.build import ModelConfig, build_unet

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def small() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))


def test_coverage_counts_linear_conv_and_the_rest():
    c = Q.coverage(small())
    assert c["linear_parameters"] == 64 * 32 + 32
    assert c["conv_parameters"] == 3 * 4 * 9 + 4
    assert c["other_parameters"] == 64
    assert c["parameters"] == c["linear_parameters"] + c["conv_parameters"] + c["other_parameters"]
    assert c["max_saving_int8"] == pytest.approx(0.75 * c["linear_parameters"] / c["parameters"])
    assert Q.linear_names(small()) == ["1"]


def test_unet_coverage_of_a_twin_allocates_nothing_and_rejects_unknown_sources():
    c = Q.unet_coverage("twin:tiny")
    assert 0 < c["linear_share"] < 1
    with pytest.raises(ValueError, match="twin"):
        Q.unet_coverage("somewhere")


@needs_torchao
@pytest.mark.parametrize("scheme", Q.QAT_SCHEMES)
def test_fake_quantization_matches_the_real_one_and_convert_gives_it(scheme):
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * 3
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    ptq = copy.deepcopy(model)
    quantize_(ptq, Q.ptq_config(scheme))
    fake = Q.prepare_qat(copy.deepcopy(model), scheme)
    with torch.no_grad():
        exact, real, simulated = model(x), ptq(x), fake(x)
    assert (real - exact).abs().max() > 1e-4  # quantization does change the output
    torch.testing.assert_close(simulated, real, atol=1e-5, rtol=1e-5)
    Q.convert_qat(fake, scheme)
    with torch.no_grad():
        torch.testing.assert_close(fake(x), real)


@needs_torchao
def test_per_token_symmetric_rounds_each_row_on_its_own_scale():
    x = torch.randn(3, 4, 16)
    x[0, 0] *= 100  # one loud token must not coarsen the others
    y = Q.PerTokenSymmetric()(x)
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    torch.testing.assert_close(y, (x / scale).round().clamp(-128, 127) * scale, atol=1e-5, rtol=1e-5)


def test_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        Q.ptq_config("int3")
    with pytest.raises(ValueError, match="QAT imitates"):
        Q.fake_quantize_configs("fp8_dynamic")


@needs_torchao
def test_variant_round_trip_and_a_changed_base_is_refused(tmp_path):
    torch.manual_seed(0)
    unet = build_unet(ModelConfig.tiny())
    tuned = copy.deepcopy(unet)
    for name in Q.linear_names(tuned):
        tuned.get_submodule(name).weight.data += 0.01
    summary = {"scheme": "int8_dynamic", "base_fingerprint": qat.unet_fingerprint(unet), "steps": 1}
    qat.save_variant(tuned, tmp_path, summary)
    assert qat.variant_problem(tmp_path, unet, "int8_dynamic") is None
    assert "int8_int4" in qat.variant_problem(tmp_path, unet, "int8_int4")
    count = qat.load_variant(unet, tmp_path, "int8_dynamic")
    assert count == len(qat.linear_state(tuned))
    for key, value in qat.linear_state(tuned).items():
        torch.testing.assert_close(qat.linear_state(unet)[key], value, atol=1e-3, rtol=1e-3)
    assert "another UNet" in qat.variant_problem(tmp_path, unet, "int8_dynamic")
    assert "no QAT weights" in qat.variant_problem(tmp_path / "none", unet, "int8_dynamic")


@needs_torchao
def test_int8_qat_applies_on_shapes_and_is_unavailable_on_a_twin():
    pipe = labkit.load_pipeline("shapes")
    change = labkit.apply(pipe, ["int8_qat"])[0]
    assert change.status == "applied", change.what
    layer = pipe.unet.get_submodule(Q.linear_names(pipe.unet)[0])
    assert type(layer.weight).__name__ == "Int8Tensor"
    twin = labkit.load_pipeline("twin:tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        change = labkit.apply(twin, ["int8_qat"])[0]
    assert change.status == "unavailable" and "int8_dynamic" in change.what
    assert tiers.OPTIMIZATIONS["int8_qat"].tier == 3


@needs_torchao
def test_qat_command_trains_checkpoints_exports_and_resumes(tmp_path):
    argv = ["--preset", "ci", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "variant")]
    assert qat.cli_main([*argv, "--threads", "1", "--no-progress"]) == 0
    config = json.loads((tmp_path / "variant" / "config.json").read_text())
    entry = config["schemes"]["int8_dynamic"]
    assert entry["steps"] == 2 and (tmp_path / "variant" / entry["weights"]).exists()
    assert (tmp_path / "run" / "checkpoints" / "qat.safetensors").exists()
    assert qat.cli_main([*argv, "--no-progress"]) == 0  # resumes: nothing left to train
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2


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
    P = get_profile("ci")
    speed = [
        _speed("none", "float32", 1.0, 400),
        _speed("int8_dynamic", "float32", 0.4, 280),
        _speed("none", P.half_dtype, 0.5, 200),
        _speed("int8_dynamic", P.half_dtype, 0.5, 170),
    ]
    same = [_score("fp32", 0.9), _score("int8_dynamic", 0.9), _score("int8_dynamic + QAT", 0.9)]
    rows = {r["claim"]: r["verdict"] for r in Q.quantization_verdict(speed, same, P)}
    assert rows["INT8: 75% memory (UNet weights, against fp32)"] == "below the claim"
    assert rows["INT8: 2-3x speed (int8 dynamic against float32)"] == "holds"
    assert rows["INT8: 75% memory (peak during generation)"] == "not measured"
    assert rows["INT8 requires QAT (int8_dynamic)"].startswith("does not hold: PTQ loses nothing")
    assert rows["INT8: moderate quality loss (post-training, int8 dynamic)"].startswith("better")
    lossy = [_score("fp32", 0.9), _score("int8_dynamic", 0.6), _score("int8_dynamic + QAT", 0.88)]
    rows = {r["claim"]: r["verdict"] for r in Q.quantization_verdict(speed, lossy, P)}
    assert rows["INT8 requires QAT (int8_dynamic)"].startswith("holds")
    assert rows["INT8: moderate quality loss (post-training, int8 dynamic)"] == "holds"
