"""labkit.training.vae: `labkit train vae` tunes the decoder only, records how, resumes alike."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from labkit import quality
from labkit.cli import main
from labkit.optimizations.swaps import swap_vae
from labkit.training import jobs, vae


def _train(out, model, *flags):
    argv = ["train", "vae", "--preset", "ci", "--model", str(model), "--out", str(out), "--no-progress"]
    return main(argv + [str(f) for f in flags])


@pytest.mark.slow
def test_the_decoder_is_tuned_and_the_encoder_kept(tmp_path, tiny_model, tiny, capsys):
    base = jobs.load_vae(tiny_model / "model")
    export = tmp_path / "export"
    assert _train(tmp_path / "run", tiny_model / "model", "--export", export) == 0
    info = json.loads((export / "tuning.json").read_text())
    assert json.loads(capsys.readouterr().out) == info
    assert info["steps"] == 4 and info["eval_n"] == 8 and info["psnr_after_db"] > 0
    tuned = AutoencoderKL.from_pretrained(export)
    assert (
        quality.encoder_fingerprint(tuned) == quality.encoder_fingerprint(base) == info["encoder_fingerprint"]
    )
    assert not torch.equal(tuned.decoder.conv_in.weight, base.decoder.conv_in.weight)

    swap_vae(tiny, vae=str(export))  # the swap_vae optimization loads it
    assert torch.equal(tiny.vae.decoder.conv_in.weight, tuned.decoder.conv_in.weight)


@pytest.mark.slow
def test_an_interrupted_tuning_resumes_to_the_same_weights(tmp_path, tiny_model, interrupt):
    model = tiny_model / "model"
    assert _train(tmp_path / "whole", model, "--eval-n", 0) == 0
    interrupt(vae.data, "sample", after=2)
    assert _train(tmp_path / "resumed", model, "--eval-n", 0) == 130
    assert _train(tmp_path / "resumed", model, "--eval-n", 0) == 0
    name = "vae/diffusion_pytorch_model.safetensors"
    whole, resumed = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # the posterior's generator came along


def test_a_missing_vae_is_a_clear_error(tmp_path, capsys):
    assert _train(tmp_path, tmp_path / "absent") == 2
    assert "no VAE at" in capsys.readouterr().err
