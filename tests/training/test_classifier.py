"""labkit.training.classifier: `labkit train classifier` trains, saves where quality reads it, resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from labkit import quality
from labkit.cli import main
from labkit.shapes import data
from labkit.training import classifier


def test_augmentations_are_seeded_and_stay_images():
    x = torch.rand(8, 3, 64, 64)
    a = classifier._augment(x, torch.Generator().manual_seed(1))
    b = classifier._augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert 0 <= a.min() and a.max() <= 1 and not torch.equal(a, x)


def _train(out, *flags):
    return main(
        ["train", "classifier", "--preset", "ci", "--out", str(out), "--no-progress", *map(str, flags)]
    )


@pytest.mark.slow
def test_the_classifier_trains_and_loads_where_quality_reads_it(tmp_path, capsys):
    export = tmp_path / "export"
    assert _train(tmp_path / "run", "--export", export) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["heldout_accuracy"]) == {"shape", "color", "position", "size", "all"}
    info = json.loads((export / "classifier.json").read_text())
    assert info["steps"] == 5 and info["heldout_accuracy"] == summary["heldout_accuracy"]
    model = quality.load_classifier(export / "classifier.safetensors")
    batch = data.sample(4, seed=0, split="test")
    assert set(quality.predict(batch.images, model)) == set(data.ATTRIBUTES)


@pytest.mark.slow
def test_an_interrupted_classifier_resumes_to_the_same_weights(tmp_path, interrupt):
    assert _train(tmp_path / "whole", "--eval-n", 0) == 0
    interrupt(classifier.data, "sample", after=2)  # the third step's batch
    assert _train(tmp_path / "resumed", "--eval-n", 0) == 130
    assert _train(tmp_path / "resumed", "--eval-n", 0) == 0
    whole = load_file(tmp_path / "whole" / "classifier.safetensors")
    resumed = load_file(tmp_path / "resumed" / "classifier.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # the augmentations' generator came along
