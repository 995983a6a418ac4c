"""Chapter 9 (distillation): the BK-SDM cuts of the twins, their costs and speed as scenarios, the shipped
student's quality scenarios, and the verdict."""

import dataclasses

import pytest

import labkit
from labkit.book import get_profile
from labkit.chapters import ch09_distillation as ch
from labkit.models import twin_config
from labkit.scenarios import check
from labkit.shapes import VARIANTS_DIR

P = get_profile("ci")
STUDENT_DIR = VARIANTS_DIR / "student"


def test_sd15_cuts_are_the_bk_sdm_twins():
    cuts = ch.twin_cuts("twin:sd15")
    assert list(cuts) == list(ch.CUTS)
    assert cuts["BK-SDM-Base cut"] == twin_config("bk-sdm-base")["unet"]
    assert cuts["BK-SDM-Small cut"] == twin_config("bk-sdm-small")["unet"]
    assert cuts["teacher"] == twin_config("sd15")["unet"]
    assert ch.twin_size("twin:sd15") == 512


def test_cost_scenarios_time_the_profiles_twin_and_count_sd15():
    scenarios = ch.cost_scenarios(P)
    for s in scenarios:
        check(s)
    assert [(s.source, s.label) for s in scenarios] == [
        (twin, label) for twin in (P.twin, ch.REAL_SCALE) for label in ch.CUTS
    ]
    sd15 = [s for s in scenarios if s.source == ch.REAL_SCALE]
    assert all(s.repeats == 0 and s.size == 512 and s.options["side"] == 64 for s in sd15)
    assert [s.notes["mid_block"] for s in sd15] == [True, True, False]


def test_unet_costs_count_fewer_flops_for_each_cut():
    timed = [s for s in ch.cost_scenarios(dataclasses.replace(P, repeats=1, warmup=0)) if s.source == P.twin]
    records = labkit.measure(timed, progress=False, say=None)
    assert [r["label"] for r in records] == list(ch.CUTS)
    params = [r["parameters"] for r in records]
    flops = [r["flops"] for r in records]
    assert params[0] > params[1] > params[2]
    assert flops[0] > flops[1] > flops[2] > 0
    assert all(r["seconds"] > 0 for r in records)
    table = ch.cuts_table(records)
    assert list(table["UNet"]) == list(ch.CUTS) and table["x fewer FLOPs"].iloc[0] == 1


def test_cut_generate_swaps_the_unet():
    quick = dataclasses.replace(P, repeats=1, warmup=0)
    scenarios = ch.speed_scenarios(quick)
    assert [s.kind for s in scenarios] == ["generate", "cut_generate", "cut_generate"]
    records = labkit.measure(scenarios, progress=False, say=None)
    assert all(r["status"] == "ok" for r in records)
    parameters = [r["unet_parameters"] for r in records]
    assert parameters[0] > parameters[1] > parameters[2]
    assert records[2]["applied"][0].startswith("distilled_student(")
    assert records[2]["applied"][1].startswith("dpm_solver(")


def test_quality_scenarios_compare_the_student_with_its_teacher():
    teacher, student = ch.quality_scenarios(P)
    check(teacher)
    check(student)
    assert student.options["reference"] == teacher.setup()
    assert ("distilled_student", {}) in student.steps_list()
    speed = ch.student_speed_scenarios(P)
    assert [(s.kind, s.label, s.optimizations) for s in speed] == [
        ("generate", "teacher", teacher.optimizations),
        ("generate", "student", student.optimizations),
    ]


@pytest.mark.skipif(not (STUDENT_DIR / "config.json").exists(), reason="no shipped student yet")
@pytest.mark.slow
def test_the_shipped_student_is_scored_against_its_teacher():
    few = dataclasses.replace(P, quality_images=2)
    teacher, student = labkit.measure(ch.quality_scenarios(few), progress=False, say=None)
    assert teacher["status"] == student["status"] == "ok"
    assert student["unet_parameters"] < 0.7 * teacher["unet_parameters"]
    assert 0 < student["psnr_vs_reference"] < 100
    table = ch.scores_table([teacher, student])
    assert list(table["UNet"]) == ["teacher", "student"]


def test_student_info_names_the_training_command():
    info = ch.student_info()
    assert info["command"].startswith("labkit train student ")
    if (STUDENT_DIR / "distill.json").exists():
        assert info["steps"] > 0 and info["stored_dtype"] == "float16"
    assert len(ch.heldout_prompts(3)) == 3


def test_verdict_reads_the_records():
    speed = [
        {"label": "teacher", "status": "ok", "s_per_image": 3.0, "source": "twin:sd15", "size": 512},
        {"label": "BK-SDM-Base cut", "status": "ok", "s_per_image": 2.0, "source": "twin:sd15",
         "size": 512},
        {"label": "BK-SDM-Small cut", "status": "oom"},
    ]  # fmt: skip
    costs = [
        {"label": "teacher", "flops": 4.0, "parameters": 10, "source": "twin:sd15", "size": 512},
        {"label": "BK-SDM-Base cut", "flops": 2.0, "parameters": 6, "source": "twin:sd15"},
        {"label": "BK-SDM-Small cut", "flops": 1.0, "parameters": 5, "source": "twin:sd15"},
    ]
    scores = [
        {"label": "teacher", "status": "ok", "prompt_accuracy": 0.99, "fid": 3.0, "n": 500, "steps": 20},
        {"label": "student", "status": "ok", "prompt_accuracy": 0.90, "fid": 6.0, "n": 500, "steps": 20},
    ]
    student_speed = [
        {"label": "teacher", "status": "ok", "s_per_image": 1.0},
        {"label": "student", "status": "ok", "s_per_image": 0.5},
    ]
    rows = {r["claim"]: r["verdict"] for r in ch.verdict_rows(speed, costs, scores, student_speed)}
    assert rows["2-4x faster: BK-SDM-Base cut"] == "below the claim"  # 1.5x
    assert rows["2-4x faster: BK-SDM-Small cut"] == "not measured"
    assert rows["2-4x faster (FLOPs per UNet evaluation): BK-SDM-Small cut, twin:sd15"] == "holds"
    assert rows["smaller model: BK-SDM-Base cut, twin:sd15"] == "holds"
    assert rows["slight quality loss (shapes student)"].startswith("does not hold")  # 9 points
    assert rows["2-4x faster: shapes student"] == "holds"
    scores[1]["prompt_accuracy"] = 0.97
    rows = {r["claim"]: r["verdict"] for r in ch.verdict_rows(speed, costs, scores)}
    assert rows["slight quality loss (shapes student)"] == "holds"
    assert "2-4x faster: shapes student" not in rows  # not timed
    scores[1] = {"label": "student", "status": "unavailable", "reason": "no student here"}
    rows = ch.verdict_rows(speed, costs, scores)
    assert rows[-1]["measured"] == "no student here" and rows[-1]["verdict"] == "not measured"
