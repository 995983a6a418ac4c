"""labkit.shapes.data: the procedural images, their prompts and labels."""

import numpy as np
import pytest

from labkit.shapes import data


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
