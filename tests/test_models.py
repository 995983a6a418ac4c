"""The three model sources and their errors (labkit.models)."""

import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import labkit
from labkit import models

# Published parameter counts of the real checkpoints: a twin must have exactly these.
REAL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    # BK-SDM (Kim et al., 2023): 0.58B and 0.48B-parameter UNets cut from SD 1.5
    "bk-sdm-base": {"unet": 579_384_964},
    "bk-sdm-small": {"unet": 482_346_884},
}


@pytest.mark.parametrize("name", sorted(REAL_PARAMETERS))
def test_twin_has_the_real_parameter_counts(name):
    components = models.twin_components(name, device="meta")
    counts = {key: sum(p.numel() for p in module.parameters()) for key, module in components.items()}
    for key, expected in REAL_PARAMETERS[name].items():
        assert counts[key] == expected, key


@pytest.mark.parametrize(
    "name, pipeline, size, scheduler, prediction",
    [
        ("sd15", "StableDiffusionPipeline", 512, "PNDMScheduler", "epsilon"),
        ("sd21", "StableDiffusionPipeline", 768, "DDIMScheduler", "v_prediction"),
        ("sdxl", "StableDiffusionXLPipeline", 1024, "EulerDiscreteScheduler", "epsilon"),
    ],
)
def test_twin_config_matches_the_published_model(name, pipeline, size, scheduler, prediction):
    config = models.twin_config(name)
    assert config["pipeline"] == pipeline
    assert config["unet"]["sample_size"] * 8 == size == config["image_size"]
    assert config["scheduler"]["class"] == scheduler
    assert config["scheduler"].get("prediction_type", "epsilon") == prediction


def test_tiny_twin_loads_and_generates(tiny):
    assert isinstance(tiny, StableDiffusionPipeline)
    assert models.is_twin(tiny) and models.native_size(tiny) == 64
    assert type(tiny.scheduler).__name__ == "PNDMScheduler"
    assert tiny.unet.dtype == torch.float32  # the baseline: full precision
    images = labkit.generate(tiny, "a red circle", steps=2, batch=2)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_twin_tokenizer_pads_to_77_within_the_vocabulary(tiny):
    ids = tiny.tokenizer("a small red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < tiny.text_encoder.config.vocab_size
    assert ids[0] == tiny.text_encoder.config.bos_token_id


def test_same_seed_same_twin():
    a = labkit.load_pipeline("twin:tiny", seed=1)
    b = labkit.load_pipeline("twin:tiny", seed=1)
    assert torch.equal(next(a.unet.parameters()), next(b.unet.parameters()))


def test_dtype_argument():
    pipe = labkit.load_pipeline("twin:tiny", dtype="fp16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16


def test_unknown_twin_lists_the_known_ones():
    with pytest.raises(labkit.SourceError, match="sd15"):
        labkit.load_pipeline("twin:nope")


def test_local_folder_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "pipe")
    assert list((tmp_path / "pipe" / "unet").glob("*.safetensors"))
    pipe = labkit.load_pipeline(str(tmp_path / "pipe"))
    assert torch.equal(next(pipe.unet.parameters()), next(tiny.unet.parameters()))


def test_missing_folder_names_the_alternatives(tmp_path):
    with pytest.raises(labkit.SourceError, match="no folder.*shapes.*twin:sd15"):
        labkit.load_pipeline(str(tmp_path / "absent"))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(labkit.SourceError, match="shapes.*twin:"):
        labkit.load_pipeline("someone/some-model-that-is-not-cached")
    assert time.perf_counter() - start < 10


def test_missing_shapes_model_says_how_to_train_it(monkeypatch, tmp_path):
    import labkit.shapes

    monkeypatch.setattr(labkit.shapes, "MODEL_DIR", tmp_path)
    with pytest.raises(labkit.SourceError, match="labkit train shapes"):
        labkit.load_pipeline("shapes")


def test_cuda_on_a_machine_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(labkit.SourceError, match="no CUDA GPU"):
        labkit.load_pipeline("twin:tiny", device="cuda")
    with pytest.raises(labkit.SourceError, match="unknown device .tpu.: use .cpu."):
        labkit.load_pipeline("twin:tiny", device="tpu")


def test_an_empty_source_is_refused():
    with pytest.raises(labkit.SourceError, match="no model source"):
        labkit.load_pipeline("")


def test_a_folder_without_a_component_names_it(tiny, tmp_path):
    import shutil

    tiny.save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "unet")
    with pytest.raises(labkit.SourceError, match="no unet/ folder"):
        labkit.load_pipeline(str(tmp_path / "pipe"))


def test_pickle_weights_are_refused_with_the_way_to_convert(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "pipe", safe_serialization=False)
    with pytest.raises(labkit.SourceError, match="safetensors only.*save_pretrained"):
        labkit.load_pipeline(str(tmp_path / "pipe"))


def test_a_variant_folder_loads_with_variant(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "pipe", variant="fp16")
    assert list((tmp_path / "pipe" / "unet").glob("*.fp16.safetensors"))
    pipe = labkit.load_pipeline(str(tmp_path / "pipe"), variant="fp16")
    assert torch.equal(next(pipe.unet.parameters()), next(tiny.unet.parameters()))


def test_generate_gives_each_image_its_own_seed(tiny):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    together = labkit.generate(tiny, prompts, steps=2, seed=5)
    apart = labkit.generate(tiny, prompts, steps=2, seed=5, chunk=1)
    np.testing.assert_allclose(together, apart, atol=1e-5)
    second = labkit.generate(tiny, prompts[1:2], steps=2, seed=6)
    np.testing.assert_allclose(together[1:2], second, atol=1e-5)


def test_unet_inputs_fit_the_unet_on_meta_and_on_the_cpu(tiny):
    for device in ("meta", "cpu"):
        unet = tiny.unet if device == "cpu" else type(tiny.unet).from_config(tiny.unet.config).to("meta")
        inputs = models.unet_inputs(unet, side=8, batch=2)
        assert inputs["sample"].shape == (2, 4, 8, 8) and inputs["sample"].device.type == device
        with torch.inference_mode():
            out = unet(**inputs).sample
        assert out.shape == (2, 4, 8, 8)
