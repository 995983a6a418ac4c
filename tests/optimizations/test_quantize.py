"""Quantization: what torchao covers, QAT's fakes match PTQ, the shipped QAT weights load only where they fit."""

import copy
import importlib.util
import warnings

import pytest
import torch

import labkit
from labkit.optimizations import OPTIMIZATIONS
from labkit.optimizations import quantize as Q

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
@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic", "int8_int4"])
def test_every_cpu_scheme_is_an_optimization_that_shrinks_the_unet(tiny, scheme):
    before = Q.weight_bytes(tiny.unet)
    change = labkit.apply(tiny, [scheme])[0]
    assert change.status == "applied" and "UNet weights" in change.what
    assert Q.weight_bytes(tiny.unet) < before
    assert OPTIMIZATIONS[scheme].tier == 3


@needs_torchao
def test_the_shipped_qat_weights_load_on_shapes_only():
    pipe = labkit.load_pipeline("shapes")
    folder = Q.qat_folder()
    assert Q.variant_problem(folder, pipe.unet, "int8_dynamic") is None
    changed = copy.deepcopy(pipe.unet)
    changed.conv_in.weight.data += 0.01
    assert "another UNet" in Q.variant_problem(folder, changed, "int8_dynamic")
    assert "no QAT weights" in Q.variant_problem(folder / "none", pipe.unet, "int8_dynamic")
    assert "labkit train qat" in Q.variant_problem(folder / "none", pipe.unet, "int8_dynamic")
    change = labkit.apply(pipe, ["int8_qat"])[0]
    assert change.status == "applied", change.what
    layer = pipe.unet.get_submodule(Q.linear_names(pipe.unet)[0])
    assert type(layer.weight).__name__ == "Int8Tensor"
    twin = labkit.load_pipeline("twin:tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        change = labkit.apply(twin, ["int8_qat"])[0]
    assert change.status == "unavailable" and "int8_dynamic" in change.what


def test_linear_state_and_fingerprint():
    model = small()
    state = Q.linear_state(model)
    assert set(state) == {"1.weight", "1.bias"}
    other = copy.deepcopy(model)
    assert Q.unet_fingerprint(other) == Q.unet_fingerprint(model)
    other[1].bias.data += 1
    assert Q.unet_fingerprint(other) != Q.unet_fingerprint(model)
