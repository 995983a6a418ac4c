"""labkit.training.samples: the page of one image per prompt kind."""

import numpy as np
import pytest

from labkit.shapes import data
from labkit.training.samples import page_prompts, sample_page


def test_page_prompts_are_every_prompt_once_in_page_order():
    prompts = page_prompts()
    assert len(prompts) == len(set(prompts)) == len(data.all_prompts())
    assert prompts[0] == data.make_prompt("circle", "red", data.POSITIONS[0], "small")
    assert data.parse_prompt(prompts[len(data.POSITIONS)])["size"] == "large"  # columns: size, then position


@pytest.mark.slow
def test_a_page_of_real_images(tmp_path):
    import matplotlib.pyplot as plt

    fig = sample_page(path=tmp_path / "page.png", dpi=20)
    assert (tmp_path / "page.png").exists() and fig.get_suptitle().startswith("real images")
    plt.close(fig)
    with pytest.raises(ValueError):  # one image per prompt kind, no fewer
        sample_page(images=np.zeros((3, 64, 64, 3)))
