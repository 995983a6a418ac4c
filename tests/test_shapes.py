"""labkit.shapes: the procedural data, the tokenizer, the shipped model, and training with resume."""

import json

import numpy as np
import pytest
import torch

from labkit.shapes import MODEL_DIR, data
from labkit.shapes.tokenizer import fit_tokenizer, load_tokenizer, prompt_words


def test_generator_is_deterministic_and_splits_differ():
    a = data.sample(16, seed=3)
    b = data.sample(16, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.prompts == b.prompts
    assert not np.array_equal(a.images, data.sample(16, seed=4).images)
    assert not np.array_equal(a.images, data.sample(16, seed=3, split="test").images)
    assert a.images.shape == (16, 64, 64, 3) and a.images.dtype == np.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0


def test_prompts_and_labels_agree():
    batch = data.sample(64, seed=0)
    for name, labels in data.prompt_labels(batch.prompts).items():
        np.testing.assert_array_equal(labels, batch.labels[name])
    assert data.parse_prompt("a small red circle at the top left") == {
        "shape": "circle",
        "color": "red",
        "position": "top left",
        "size": "small",
    }
    assert len(set(data.all_prompts())) == 3 * 5 * 9 * 2
    with pytest.raises(ValueError):
        data.parse_prompt("a photo of a cat")


def test_images_show_the_prompt():
    # the shape's colour is in the image and sits in the named grid cell
    batch = data.sample(32, seed=1)
    for image, attrs in zip(batch.images, map(data.parse_prompt, batch.prompts), strict=True):
        distance = np.abs(image - np.array(data.RGB[attrs["color"]])).sum(-1)
        ys, xs = np.nonzero(distance < 0.2)
        assert len(ys) > 20
        row, col = divmod(data.POSITIONS.index(attrs["position"]), 3)
        assert abs(ys.mean() - data.GRID_CENTERS[row]) < 6 and abs(xs.mean() - data.GRID_CENTERS[col]) < 6


def test_tokenizer_round_trip(tmp_path):
    tokenizer = fit_tokenizer(tmp_path / "tok")
    assert tokenizer.model_max_length == 77
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()
    for word in prompt_words():
        assert len(tokenizer.tokenize(word)) == 1, word
    for prompt in data.all_prompts():
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(prompt.split()) + 2
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    padded = tokenizer(["a small red circle at the top left", ""], padding="max_length", max_length=77)
    assert all(len(ids) == 77 for ids in padded.input_ids)
    # reloading the folder gives the same tokenizer
    assert load_tokenizer(tmp_path / "tok")(prompt).input_ids == tokenizer(prompt).input_ids


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


def test_training_runs_checkpoints_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from labkit.shapes.train import cli_main

    out = tmp_path / "run"
    args = ["--preset", "tiny", "--out", str(out), "--no-progress", "--prediction-type", "v_prediction"]
    assert cli_main(args + ["--unet-steps", "2"]) == 0
    assert json.loads((out / "checkpoints" / "vae.json").read_text())["step"] == 3
    assert json.loads((out / "checkpoints" / "unet.json").read_text())["step"] == 2

    # the same command with more steps resumes: the VAE stage is done, the UNet goes on from step 2
    assert cli_main(args + ["--unet-steps", "4"]) == 0
    assert json.loads((out / "checkpoints" / "vae.json").read_text())["step"] == 3
    assert json.loads((out / "checkpoints" / "unet.json").read_text())["step"] == 4
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [1, 2, 3, 4]

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (out / "model" / "tokenizer" / "vocab.json").exists()
    images = pipe("a small red circle at the top left", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
