"""labkit.shapes.build and the shipped model: small, offline, SD 1.5's scheduler, it generates."""

import numpy as np
import pytest
import torch

from labkit.shapes import MODEL_DIR
from labkit.shapes.build import ModelConfig, build_pipeline, count_parameters


@pytest.fixture(scope="module")
def shipped_pipe():
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    mp.undo()


def test_shipped_model_is_small_and_loads_offline(shipped_pipe):
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size < 25 * 1024 * 1024
    assert not list(MODEL_DIR.rglob("*.bin")) and not list(MODEL_DIR.rglob("*.pt"))
    pipe = shipped_pipe
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.dtype == torch.float32
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.steps_offset == 1 and config.skip_prk_steps and not config.set_alpha_to_one
    assert (
        config.prediction_type == "epsilon" and config.clip_sample is False
    )  # as SD 1.5: DDIM must not clip
    assert pipe.tokenizer.model_max_length == 77
    prompt = "a large blue triangle in the center"
    assert pipe.tokenizer.decode(pipe.tokenizer(prompt).input_ids, skip_special_tokens=True) == prompt


def test_shipped_model_generates(shipped_pipe):
    from diffusers import DPMSolverMultistepScheduler

    pipe = shipped_pipe
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    prompts = ["a small red circle at the top left", "a large green square on the right"]

    def run():
        generator = torch.Generator().manual_seed(0)
        return pipe(prompts, num_inference_steps=4, generator=generator, output_type="np").images

    images = run()
    assert images.shape == (2, 64, 64, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_allclose(images, run(), atol=1e-5)


def test_an_untrained_pipeline_of_any_size(tmp_path):
    tiny = ModelConfig.tiny()
    pipe = build_pipeline(tiny, tmp_path / "tok", prediction_type="v_prediction", rescale_zero_snr=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (
        pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    )
    assert pipe.unet.config.cross_attention_dim == tiny.text_hidden == pipe.text_encoder.config.hidden_size
    assert count_parameters(pipe.unet) < count_parameters(build_pipeline(ModelConfig(), tmp_path / "t2").unet)
    assert ModelConfig.from_dict(tiny.to_dict()) == tiny
    assert tiny.latent_size == 16
