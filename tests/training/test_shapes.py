"""labkit.training.shapes: `labkit train shapes` trains the VAE and the UNet, checkpoints, resumes, exports."""

import json

import pytest
import torch
from safetensors.torch import load_file

from labkit.cli import main
from labkit.training import jobs


def _train(out, *flags):
    return main(["train", "shapes", "--preset", "tiny", "--out", str(out), "--no-progress", *map(str, flags)])


@pytest.mark.slow
def test_training_runs_checkpoints_and_resumes(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out, export = tmp_path / "run", tmp_path / "export"
    flags = ["--prediction-type", "v_prediction", "--export", export]
    assert _train(out, *flags, "--steps", 2) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == ["vae", "unet"]
    assert json.loads((out / "checkpoints" / "vae.json").read_text())["step"] == 3
    assert json.loads((out / "checkpoints" / "unet.json").read_text())["step"] == 2

    # the same command with more steps resumes: the VAE stage is done, the UNet goes on from step 2
    assert _train(out, *flags, "--steps", 4) == 0
    assert json.loads((out / "checkpoints" / "vae.json").read_text())["step"] == 3
    assert json.loads((out / "checkpoints" / "unet.json").read_text())["step"] == 4
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [1, 2, 3, 4]

    pipe = StableDiffusionPipeline.from_pretrained(export)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (export / "tokenizer" / "vocab.json").exists()
    info = json.loads((export / "labkit_shapes.json").read_text())
    assert info["unet_steps"] == 4 and info["train_config"]["prediction_type"] == "v_prediction"
    images = pipe("a small red circle at the top left", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, interrupt):
    assert _train(tmp_path / "whole", "--steps", 3) == 0
    interrupt(jobs, "sample_timesteps", after=1)  # in the middle of the second UNet step
    assert _train(tmp_path / "resumed", "--steps", 3) == 130
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "unet.json").read_text())["step"] == 1
    assert _train(tmp_path / "resumed", "--steps", 3) == 0
    for name in ("vae", "unet"):  # weights, optimizer moments, EMA
        whole = load_file(tmp_path / "whole" / "checkpoints" / f"{name}.safetensors")
        resumed = load_file(tmp_path / "resumed" / "checkpoints" / f"{name}.safetensors")
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name


def test_bad_stages_and_a_missing_vae_are_clear_errors(tmp_path, capsys):
    assert _train(tmp_path, "--stages", "nonsense") == 2
    assert "choose from vae, unet" in capsys.readouterr().err
    assert _train(tmp_path, "--stages", "unet", "--vae-from", tmp_path / "absent") == 2
    assert "give 'shapes'" in capsys.readouterr().err
