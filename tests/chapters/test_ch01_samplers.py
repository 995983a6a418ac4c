"""Chapter 1, samplers: its scenarios, the time-per-evaluation fit, steps to match, the verdict rows."""

from __future__ import annotations

import math

import pytest

import labkit
from labkit.book import PROFILES
from labkit.chapters import ch01_samplers as ch
from labkit.scenarios import check, measure


def test_profiles_have_the_sampler_fields():
    for profile in PROFILES.values():
        assert list(profile.sampler_steps) == sorted(profile.sampler_steps)
        assert profile.ddpm_steps >= profile.steps
        assert isinstance(profile.as_dict()["sampler_steps"], list)
    gpu = PROFILES["gpu"]
    assert gpu.ddpm_steps == 1000 and {15, 20, 50} <= set(gpu.sampler_steps)


@pytest.mark.parametrize("name", ["ci", "gpu"])
def test_the_scenarios_are_valid_and_distinct(name):
    P = PROFILES[name]
    speed, scores = ch.speed_scenarios(P), ch.quality_scenarios(P)
    for scenario in speed + scores:
        check(scenario)
    assert len({s.key for s in speed}) == len(speed) and len({s.key for s in scores}) == len(scores)
    assert {s.notes["sampler"] for s in speed} == set(labkit.optimizations.SAMPLERS)
    ddpm = [s for s in speed if s.notes["sampler"] == "DDPM"]
    assert len(ddpm) == 1 and ddpm[0].steps == P.ddpm_steps and ddpm[0].warmup == 0
    assert all(s.kind == "quality" and s.n == P.quality_images and s.source == P.model for s in scores)


def test_speed_records_of_a_few_samplers(tmp_path):
    P = PROFILES["ci"]
    work = [s.but(repeats=1, warmup=0) for s in ch.speed_scenarios(P) if s.steps == P.fast_steps][:2]
    records = measure(work, tmp_path, say=None)
    assert [r["sampler"] for r in records] == [s.notes["sampler"] for s in work]
    assert all(r["status"] == "ok" and r["s_per_image"] > 0 for r in records)
    assert records[0]["denoiser_evaluations"] >= P.fast_steps


def test_time_per_evaluation_fits_a_line():
    rows = [{"status": "ok", "denoiser_evaluations": n, "s_per_image": 0.5 + 0.1 * n} for n in (2, 5, 10)]
    fit = ch.time_per_evaluation(rows + [{"status": "oom"}])
    assert fit["fixed_s"] == pytest.approx(0.5) and fit["per_evaluation_s"] == pytest.approx(0.1)
    assert fit["max_residual"] == pytest.approx(0, abs=1e-9)


def test_steps_to_match():
    rows = [
        {"sampler": "A", "steps": s, "prompt_accuracy": acc, "fid": f}
        for s, acc, f in ((5, 0.2, 90), (10, 0.6, 40), (20, 0.8, 21))
    ]
    assert ch.steps_to_match(rows, "A", 0.6) == 10
    assert ch.steps_to_match(rows, "A", 0.65, margin=0.05) == 10
    assert ch.steps_to_match(rows, "A", 0.9) is None
    assert ch.steps_to_match(rows, "A", 20, metric="fid", margin=2) == 20
    assert ch.steps_to_match(rows, "A", 40, metric="fid") == 10
    assert ch.steps_to_match(rows, "B", 0.1) is None


def test_sampler_images_share_their_seeds():
    pipe = labkit.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    images, labels = ch.sampler_images(pipe, [("DDIM", 1), ("Euler", 1)], ["a small red circle at the top"])
    assert images.shape == (2, 64, 64, 3) and labels == ["DDIM 1", "Euler 1"]
    assert all(math.isfinite(v) for v in images.reshape(-1)[:10])


def _speed(sampler, steps, seconds, memory=None):
    return {"sampler": sampler, "steps": steps, "s_per_image": seconds, "peak_allocated_gb": memory,
            "device": "test device"}  # fmt: skip


def _score(sampler, steps, accuracy, fid, n=100):
    return {"sampler": sampler, "steps": steps, "prompt_accuracy": accuracy, "fid": fid, "n": n,
            "label": f"{sampler} {steps}"}  # fmt: skip


def test_verdict_rows_from_records():
    P = PROFILES["gpu"]
    speed = [
        _speed("DDPM", 1000, 40.0, 3.0),
        _speed("PNDM", 50, 2.0, 3.0),
        _speed("DDIM", 50, 2.0, 3.0),
        _speed("DPM++ 2M", 20, 0.8, 3.0),
    ]
    scores = [_score("DDIM", s, a, f) for s, a, f in ((20, 0.5, 40), (50, 0.8, 20), (100, 0.82, 19))]
    scores += [_score("DPM++ 2M", s, a, f) for s, a, f in ((10, 0.7, 25), (15, 0.8, 20), (20, 0.81, 20))]
    rows = ch.verdict_rows(speed, scores, P)
    assert all(set(r) == {"claim", "claimed", "measured", "verdict"} for r in rows)
    by_claim = {r["claim"]: r for r in rows}
    assert by_claim["DDIM 50: good balance"]["verdict"] == "holds"  # 0.8 / 0.82
    assert by_claim["10-20x speed-up, against PNDM 50 (SD 1.x's default)"]["verdict"] == "below the claim"
    assert by_claim["30% memory reduction"]["verdict"] == "below the claim"  # same memory
    assert "15 steps" in rows[-1]["measured"] and rows[-1]["verdict"] == "holds"
    # on a CPU there is no memory counter: "not measured", never a fake pass
    cpu = [dict(r, peak_allocated_gb=None) for r in speed]
    memory = [r for r in ch.verdict_rows(cpu, scores, P) if r["claim"] == "30% memory reduction"]
    assert memory[0]["verdict"] == "not measured" and "not measurable" in memory[0]["measured"]
