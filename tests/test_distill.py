"""The distillation chapter's logic: the BK-SDM cut, the distillation trainer, the shipped student."""

import json

import pytest
import torch

import labkit
from labkit import distill, tiers
from labkit.models import twin_config
from labkit.shapes import VARIANTS_DIR
from labkit.shapes.build import ModelConfig, build_pipeline, build_unet, count_parameters
from labkit.shapes.distill import bk_layers, build_student, cli_main, distill_losses, student_config

STUDENT_DIR = VARIANTS_DIR / "student"


# ---------------------------------------------------------------------------------------------------
# the cut


def test_sd15_cuts_are_the_bk_sdm_twins():
    cuts = distill.twin_cuts("twin:sd15")
    assert cuts["BK-SDM-Base cut"] == twin_config("bk-sdm-base")["unet"]
    assert cuts["BK-SDM-Small cut"] == twin_config("bk-sdm-small")["unet"]
    assert cuts["teacher"] == twin_config("sd15")["unet"]


def test_cut_keeps_residuals_that_change_the_width():
    config = {"block_out_channels": [32, 64, 64, 96, 96], "layers_per_block": 1}
    assert bk_layers(config) == [0, 1, 0, 1, 0]
    assert bk_layers({"block_out_channels": [320, 640], "layers_per_block": 2}) == [1, 1]


def test_student_config_rejects_impossible_cuts():
    teacher = dict(build_unet(ModelConfig()).config)
    with pytest.raises(ValueError, match="channels"):
        student_config(teacher, (1, 0, 1, 1, 1))  # stage 1 goes 32 -> 64
    with pytest.raises(ValueError, match="one count per stage"):
        student_config(teacher, (1, 1))
    config = student_config(teacher, (0, 1, 0, 1, 0))
    assert config["mid_block_type"] is None and config["layers_per_block"] == [0, 1, 0, 1, 0]


def test_student_starts_from_the_teacher_and_is_smaller():
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


def test_unet_costs_count_fewer_flops_for_each_cut():
    records = distill.unet_costs("twin:tiny", 64, device="cpu", dtype="float32", repeats=1, warmup=0)
    assert [r["label"] for r in records] == list(distill.CUTS)
    params = [r["parameters"] for r in records]
    flops = [r["flops_per_evaluation"] for r in records]
    assert params[0] > params[1] > params[2]
    assert flops[0] > flops[1] > flops[2] > 0
    assert all(r["s_per_evaluation"] > 0 for r in records)


def test_cut_pipeline_swaps_the_unet():
    pipe = distill.cut_pipeline("twin:tiny", "BK-SDM-Small cut", device="cpu", dtype="float32")
    assert pipe.unet.mid_block is None
    with pytest.raises(ValueError, match="unknown cut"):
        distill.cut_pipeline("twin:tiny", "BK-SDM-Huge", device="cpu", dtype="float32")


def test_verdict_reads_the_records():
    speed = [
        {"label": "teacher", "status": "ok", "s_per_image": 3.0, "source": "twin:sd15", "size": 512},
        {"label": "BK-SDM-Base cut", "status": "ok", "s_per_image": 2.0, "source": "twin:sd15",
         "size": 512},
        {"label": "BK-SDM-Small cut", "status": "oom"},
    ]  # fmt: skip
    costs = [
        {"label": "teacher", "flops_per_evaluation": 4.0, "parameters": 10, "source": "twin:sd15",
         "size": 512},
        {"label": "BK-SDM-Base cut", "flops_per_evaluation": 2.0, "parameters": 6,
         "source": "twin:sd15"},
        {"label": "BK-SDM-Small cut", "flops_per_evaluation": 1.0, "parameters": 5,
         "source": "twin:sd15"},
    ]  # fmt: skip
    scores = [
        {"label": "teacher", "status": "ok", "prompt_accuracy": 0.99, "fid": 3.0, "n": 500,
         "steps": 20, "s_per_image": 1.0},
        {"label": "student", "status": "ok", "prompt_accuracy": 0.90, "fid": 6.0, "n": 500,
         "steps": 20, "s_per_image": 0.5},
    ]  # fmt: skip
    rows = {r["claim"]: r["verdict"] for r in distill.distillation_verdict(speed, costs, scores)}
    assert rows["2-4x faster: BK-SDM-Base cut"] == "below the claim"  # 1.5x
    assert rows["2-4x faster: BK-SDM-Small cut"] == "not measured"
    assert rows["2-4x faster (FLOPs per UNet evaluation): BK-SDM-Small cut, twin:sd15"] == "holds"
    assert rows["smaller model: BK-SDM-Base cut, twin:sd15"] == "holds"
    assert rows["slight quality loss (shapes student)"].startswith("does not hold")  # 9 points
    assert rows["2-4x faster: shapes student"] == "holds"
    scores[1]["prompt_accuracy"] = 0.97
    rows = {r["claim"]: r["verdict"] for r in distill.distillation_verdict(speed, costs, scores)}
    assert rows["slight quality loss (shapes student)"] == "holds"


# ---------------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    pipe = build_pipeline(ModelConfig.tiny(), folder / "tok")
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    return folder / "model"


def test_distillation_runs_checkpoints_and_resumes(tmp_path, tiny_teacher):
    out, export = tmp_path / "run", tmp_path / "export"
    args = ["--preset", "ci", "--teacher", str(tiny_teacher), "--out", str(out), "--no-progress"]
    args += ["--bank-size", "16", "--batch-size", "4", "--export", str(export)]
    assert cli_main(args + ["--steps", "2"]) == 0
    assert json.loads((out / "checkpoints" / "student.json").read_text())["step"] == 2
    assert cli_main(args + ["--steps", "3"]) == 0  # the same command with more steps resumes
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["task"] > 0 and r["feat_kd"] >= 0 for r in log)
    info = json.loads((export / "distill.json").read_text())
    assert info["steps"] == 3 and info["stored_dtype"] == "float16"
    assert info["parameters"]["student"] < info["parameters"]["teacher"]
    # the exported student is a UNet folder that tiers.distilled_student loads, in the pipeline's dtype
    pipe = labkit.load_pipeline(str(tiny_teacher), device="cpu")
    before = count_parameters(pipe.unet)
    tiers.distilled_student(pipe, unet=str(export))
    assert pipe.unet.dtype == torch.float32 and count_parameters(pipe.unet) < before
    images = pipe("a small red circle at the top left", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_bad_teacher_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="shapes pipeline folder"):
        cli_main(["--preset", "ci", "--teacher", str(tmp_path), "--out", str(tmp_path / "o"),
                  "--no-progress"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# the shipped student


@pytest.mark.skipif(not (STUDENT_DIR / "config.json").exists(), reason="no shipped student yet")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shipped_student_loads_smaller_in_the_pipeline_dtype(dtype):
    pipe = labkit.load_pipeline("shapes", device="cpu", dtype=dtype)
    teacher = count_parameters(pipe.unet)
    (change,) = labkit.apply(pipe, ["distilled_student"])
    assert change.status == "applied", change.what
    assert pipe.unet.dtype == getattr(torch, dtype)
    assert count_parameters(pipe.unet) < 0.7 * teacher
    assert pipe.unet.mid_block is None
    size = sum(p.stat().st_size for p in STUDENT_DIR.rglob("*") if p.is_file())
    assert size < 8 * 1024 * 1024
    assert not list(STUDENT_DIR.rglob("*.bin")) and not list(STUDENT_DIR.rglob("*.pt"))
