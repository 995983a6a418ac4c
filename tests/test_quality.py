"""labkit.quality: the shipped classifier and the metrics built on it (prompt accuracy, FID, PSNR)."""

import json

import numpy as np
import pytest

from labkit import quality
from labkit.shapes import CLASSIFIER_CONFIG_PATH, CLASSIFIER_PATH, data


@pytest.fixture(scope="module")
def real():
    return data.sample(600, seed=777, split="test")


def test_classifier_is_shipped_with_its_config():
    assert CLASSIFIER_PATH.exists() and CLASSIFIER_CONFIG_PATH.exists()
    config = json.loads(CLASSIFIER_CONFIG_PATH.read_text())
    assert all(acc >= 0.99 for acc in config["heldout_accuracy"].values())


def test_classifier_accuracy_on_fresh_samples(real):
    accuracy = quality.attribute_accuracy(real.images, real.prompts)
    assert set(accuracy) == {"shape", "color", "position", "size", "all"}
    for name, value in accuracy.items():
        assert value >= 0.99, (name, value)
    assert quality.prompt_accuracy(real.images, real.prompts) == accuracy["all"]


def test_prompt_accuracy_drops_when_images_do_not_match(real):
    shuffled = real.images[..., [2, 0, 1]]  # red -> green, blue -> red, ...: colours no longer match
    accuracy = quality.attribute_accuracy(shuffled, real.prompts)
    assert accuracy["color"] < 0.5 and accuracy["all"] < 0.5
    assert accuracy["position"] >= 0.95  # the rest of the picture is still right
    wrong_prompts = real.prompts[1:] + real.prompts[:1]
    assert quality.prompt_accuracy(real.images, wrong_prompts) < 0.1


def test_fid_real_vs_real_is_small_and_colour_shuffle_is_large():
    # two independent sets of 1000 real images differ only by sampling noise (FID about 10 at this n);
    # the same images with their colour channels rotated are far away
    a = data.sample(1000, seed=777, split="test").images
    b = data.sample(1000, seed=778, split="test").images
    same = quality.fid(a, b)
    shuffled = quality.fid(a, b[..., [2, 0, 1]])
    assert 0 <= same < 15
    assert shuffled > 4 * same


def test_psnr():
    a = data.sample(8, seed=0).images
    assert quality.psnr(a, a) == 100.0
    noise = np.random.default_rng(0).normal(0, 0.01, a.shape).astype(np.float32)
    assert 38 < quality.psnr(a, np.clip(a + noise, 0, 1)) < 42  # 0.01 noise is 40 dB
    with pytest.raises(ValueError):
        quality.psnr(a, a[:4])


def test_evaluate_a_pipeline():
    from diffusers import DPMSolverMultistepScheduler

    import labkit

    pipe = labkit.load_pipeline("shapes", device="cpu")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = quality.evaluate(pipe, n=6, steps=4, batch_size=3, return_images=True)
    assert result["images"].shape == (6, 64, 64, 3)
    assert 0.0 <= result["prompt_accuracy"] <= 1.0 and result["fid"] >= 0
    # per-image seeds: the same picture whatever the batch size
    again = labkit.generate(pipe, result["prompts"][:2], steps=4, guidance=quality.DEFAULT_GUIDANCE, chunk=2)
    assert quality.psnr(again, result["images"][:2]) > 40


@pytest.mark.parametrize(
    ("p", "n", "low", "high"), [(0.5, 100, 0.404, 0.596), (1.0, 500, 0.992, 1.0), (0.0, 8, 0.0, 0.324)]
)
def test_wilson_interval(p, n, low, high):
    lo, hi = quality.wilson_interval(p, n)
    assert lo == pytest.approx(low, abs=1e-3) and hi == pytest.approx(high, abs=1e-3)
    with pytest.raises(ValueError):
        quality.wilson_interval(0.5, 0)
