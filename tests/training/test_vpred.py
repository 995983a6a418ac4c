"""labkit.training.vpred: `labkit train vpred` trains the variant's UNet and ships it as ``shapes:NAME``."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from labkit import shapes
from labkit.cli import main
from labkit.models import SourceError, load_pipeline, shapes_variants
from labkit.training.vpred import PRESETS, same_weights, ship_variant


def test_the_presets_are_the_shapes_ones_with_v_prediction():
    for preset in PRESETS.values():
        assert preset["prediction_type"] == "v_prediction" and preset["rescale_zero_snr"] is True
        assert preset["beta_schedule"] == "squaredcos_cap_v2" and preset["vae_from"] == "shapes"


def test_same_weights(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2)}, tmp_path / name / "model.safetensors")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    save_file({"w": torch.zeros(2)}, tmp_path / "b" / "model.safetensors")
    assert not same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_ship_a_variant_and_load_it(tmp_path, monkeypatch):
    trained = tmp_path / "trained"
    shutil.copytree(shapes.MODEL_DIR, trained)
    variants = tmp_path / "variants"
    monkeypatch.setattr(shapes, "VARIANTS_DIR", variants)
    (variants / "vae").mkdir(parents=True)  # a VAE variant is not a pipeline variant
    dest = ship_variant(trained, variants / "mine")
    assert dest == variants / "mine" and shapes_variants() == ["mine"]
    scheduler = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"
    pipe = load_pipeline("shapes:mine", device="cpu")
    assert pipe.unet.dtype == torch.float32  # stored fp16, upcast
    assert pipe.labkit_source == "shapes:mine" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(SourceError, match="'shapes:mine'"):
        load_pipeline("shapes:nope", device="cpu")
    # a variant must share the shipped text encoder and VAE
    path = next((trained / "text_encoder").glob("*.safetensors"))
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    with pytest.raises(ValueError, match="text_encoder"):
        ship_variant(trained, variants / "other")


@pytest.mark.slow
def test_vpred_trains_on_a_given_vae_and_ships(tmp_path, tiny_model):
    out, dest, base = tmp_path / "run", tmp_path / "variant", tiny_model / "model"
    argv = ["train", "vpred", "--preset", "tiny", "--out", str(out), "--no-progress", "--vae-from", str(base)]
    assert main([*argv, "--steps", "2", "--export", str(dest)]) == 0
    info = json.loads((dest / "labkit_shapes.json").read_text())
    assert info["unet_steps"] == 2 and info["train_config"]["vae_from"] == str(base)
    scheduler = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2" and scheduler["timestep_spacing"] == "trailing"
    unet = load_file(dest / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in unet.values())
    shutil.rmtree(dest)  # shipping alone, from the trained pipeline
    assert (
        main(
            [
                "train",
                "vpred",
                "--vae-from",
                str(base),
                "--ship-from",
                str(out / "model"),
                "--export",
                str(dest),
            ]
        )
        == 0
    )
    shipped = load_file(dest / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], trained[k].half()) for k in trained)
    assert (dest / "scheduler" / "scheduler_config.json").exists()


def test_shipping_needs_a_destination_and_a_trained_folder(tmp_path, capsys):
    assert main(["train", "vpred", "--ship-from", str(tmp_path)]) == 2
    assert "--export" in capsys.readouterr().err
    assert main(["train", "vpred", "--ship-from", str(tmp_path), "--export", str(tmp_path / "v")]) == 2
    assert "not a trained shapes pipeline" in capsys.readouterr().err
