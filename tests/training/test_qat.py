"""labkit.training.qat: the QAT variant's files, and `labkit train qat` (needs torchao)."""

import copy
import importlib.util
import json

import pytest
import torch

from labkit.cli import main
from labkit.optimizations import quantize as Q
from labkit.shapes.build import ModelConfig, build_unet
from labkit.training import qat

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def test_variant_round_trip_and_a_changed_base_is_refused(tmp_path):
    torch.manual_seed(0)
    unet = build_unet(ModelConfig.tiny())
    tuned = copy.deepcopy(unet)
    for name in Q.linear_names(tuned):
        tuned.get_submodule(name).weight.data += 0.01
    summary = {"scheme": "int8_dynamic", "base_fingerprint": Q.unet_fingerprint(unet), "steps": 1}
    qat.save_variant(tuned, tmp_path, summary)
    assert Q.variant_problem(tmp_path, unet, "int8_dynamic") is None
    assert "int8_int4" in Q.variant_problem(tmp_path, unet, "int8_int4")
    count = Q.load_variant(unet, tmp_path, "int8_dynamic")
    assert count == len(Q.linear_state(tuned))
    for key, value in Q.linear_state(tuned).items():
        torch.testing.assert_close(Q.linear_state(unet)[key], value, atol=1e-3, rtol=1e-3)
    assert "another UNet" in Q.variant_problem(tmp_path, unet, "int8_dynamic")
    assert "no QAT weights" in Q.variant_problem(tmp_path / "none", unet, "int8_dynamic")
    config = json.loads((tmp_path / Q.VARIANT_CONFIG).read_text())
    assert (
        config["kind"] == "qat" and config["schemes"]["int8_dynamic"]["weights"] == "int8_dynamic.safetensors"
    )


@needs_torchao
@pytest.mark.slow
def test_qat_trains_checkpoints_exports_resumes_and_refuses_another_base(tmp_path, capsys):
    out, export = tmp_path / "run", tmp_path / "variant"
    argv = ["train", "qat", "--preset", "ci", "--out", str(out), "--export", str(export), "--no-progress"]
    assert main([*argv, "--threads", "1"]) == 0
    entry = json.loads((export / "config.json").read_text())["schemes"]["int8_dynamic"]
    assert entry["steps"] == 2 and (export / entry["weights"]).exists()
    assert (
        entry["base_fingerprint"]
        == json.loads((out / "checkpoints" / "qat.json").read_text())["base_fingerprint"]
    )
    assert main(argv) == 0  # resumes: nothing left to train
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    capsys.readouterr()
    checkpoint = out / "checkpoints" / "qat.json"
    checkpoint.write_text(json.dumps(json.loads(checkpoint.read_text()) | {"base_fingerprint": "another"}))
    assert main(argv) == 2
    assert "another base UNet" in capsys.readouterr().err


def test_an_unknown_scheme_is_refused_by_the_parser(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "qat", "--scheme", "fp8_dynamic", "--out", str(tmp_path)])
