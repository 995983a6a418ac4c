"""labkit.training.student: the BK-SDM student, its losses, and `labkit train student`."""

import json

import pytest
import torch

from labkit.cli import main
from labkit.models import load_pipeline
from labkit.optimizations import apply
from labkit.optimizations.swaps import bk_layers, student_config
from labkit.shapes.build import ModelConfig, build_unet, count_parameters
from labkit.training.student import build_student, distill_losses


def test_the_cut_keeps_residuals_that_change_the_width():
    config = {"block_out_channels": [32, 64, 64, 96, 96], "layers_per_block": 1}
    assert bk_layers(config) == [0, 1, 0, 1, 0]
    assert bk_layers({"block_out_channels": [320, 640], "layers_per_block": 2}) == [1, 1]
    teacher = dict(build_unet(ModelConfig()).config)
    with pytest.raises(ValueError, match="channels"):
        student_config(teacher, (1, 0, 1, 1, 1))  # stage 1 goes 32 -> 64
    with pytest.raises(ValueError, match="one count per stage"):
        student_config(teacher, (1, 1))
    config = student_config(teacher, (0, 1, 0, 1, 0))
    assert config["mid_block_type"] is None and config["layers_per_block"] == [0, 1, 0, 1, 0]


@pytest.mark.slow
def test_the_student_starts_from_the_teacher_and_is_smaller():
    torch.manual_seed(0)
    teacher = build_unet(ModelConfig()).eval()
    student, copied = build_student(teacher)
    assert copied == 1.0  # every parameter the student has, the teacher has too
    assert count_parameters(student) < 0.7 * count_parameters(teacher)
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 64)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert student(x, t, context).sample.shape == teacher(x, t, context).sample.shape
    losses = distill_losses(student, teacher, x, t, context, torch.randn_like(x))
    assert set(losses) == {"task", "out_kd", "feat_kd"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in losses.values())
    assert (losses["feat_kd"] > 0).all()
    # the teacher is its own perfect student: no KD loss at all
    same = distill_losses(teacher, teacher, x, t, context, torch.randn_like(x))
    assert same["out_kd"].abs().max() == 0 and same["feat_kd"].abs().max() == 0


def _train(out, teacher, *flags):
    argv = [
        "train",
        "student",
        "--preset",
        "ci",
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--no-progress",
    ]
    return main(argv + ["--bank-size", "16", "--batch-size", "4", *map(str, flags)])


@pytest.mark.slow
def test_distillation_runs_checkpoints_exports_and_resumes(tmp_path, tiny_model):
    out, export, teacher = tmp_path / "run", tmp_path / "export", tiny_model / "model"
    assert _train(out, teacher, "--export", export, "--steps", 2) == 0
    assert json.loads((out / "checkpoints" / "student.json").read_text())["step"] == 2
    assert _train(out, teacher, "--export", export, "--steps", 3) == 0  # the same command, more steps
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["task"] > 0 and r["feat_kd"] >= 0 for r in log)
    info = json.loads((export / "distill.json").read_text())
    assert info["steps"] == 3 and info["stored_dtype"] == "float16" and info["teacher"] == str(teacher)
    assert info["parameters"]["student"] < info["parameters"]["teacher"]
    # the exported student is a UNet folder that the distilled_student optimization loads, in the pipeline's dtype
    pipe = load_pipeline(str(teacher), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    before = count_parameters(pipe.unet)
    (change,) = apply(pipe, [("distilled_student", {"unet": str(export)})])
    assert change.status == "applied"
    assert pipe.unet.dtype == torch.float32 and count_parameters(pipe.unet) < before
    images = pipe("a small red circle at the top left", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_a_bad_teacher_folder_says_what_is_missing(tmp_path, capsys):
    assert _train(tmp_path / "out", tmp_path) == 2
    assert "model_index.json" in capsys.readouterr().err
