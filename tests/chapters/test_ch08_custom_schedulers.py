"""Chapter 8 (custom schedulers): the guide's snippets, the schedules, DDIM that keeps the training, the
quality scenarios and the verdict."""

import dataclasses
import json

import pytest
import torch

import labkit
from labkit import shapes
from labkit.book import get_profile
from labkit.chapters import ch08_custom_schedulers as ch
from labkit.models import shapes_variants
from labkit.scenarios import check

P = get_profile("ci")
VPRED = {
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}


def test_the_guides_snippets_are_caught_not_raised():
    rows = ch.try_snippets(shapes.MODEL_DIR)
    by = {r["snippet"]: r for r in rows}
    for snippet in ch.GUIDE_SNIPPETS:  # "cosine" is not a diffusers name
        assert not by[snippet]["ok"] and "NotImplementedError" in by[snippet]["outcome"]
    fixed = by['DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")']
    assert fixed["ok"] and "clip_sample=True" in fixed["outcome"]  # class defaults, not the model's
    assert rows[0]["ok"] and "clip_sample=False" in rows[0]["outcome"]  # the model's own config


def test_terminal_snr_of_the_schedules():
    linear, cosine, zero = ch.schedule_table()
    assert linear["SNR at t=999"] == pytest.approx(0.0047, abs=2e-4)
    assert 0 < cosine["SNR at t=999"] < 1e-6
    assert zero["SNR at t=999"] == 0.0
    assert all(r["SNR at t=0"] > r["SNR at t=500"] > r["SNR at t=999"] for r in (linear, cosine))


def test_use_ddim_keeps_the_training_and_warns_on_a_mismatch(tiny):
    tiny.labkit_scheduler_config = {**tiny.labkit_scheduler_config, **VPRED}
    what = ch.use_ddim(tiny, 7)
    config = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "DDIMScheduler" and "WARNING" not in what
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing" and tiny.labkit_call["steps"] == 7
    what = ch.use_ddim(tiny, 7, prediction_type="epsilon", rescale_betas_zero_snr=False)
    assert "WARNING" in what and "prediction_type='v_prediction'" in what
    assert "rescale_betas_zero_snr=True" in what


def test_the_notes_warn_as_custom_scheduler_does(tiny):
    settings = ch.trained("shapes")
    for overrides in ch.MISMATCHES.values():
        options = ch.ddim_options(settings, **overrides)
        what = ch.use_ddim(tiny, 2, **overrides)  # tiny was built for epsilon on scaled_linear, as shapes
        warning = ch.mismatch_warning(settings, options)
        assert (warning is None) == ("WARNING" not in what)
        assert warning is None or what.endswith(f"WARNING: {warning}")


def test_trained_settings_of_the_model_and_its_variant():
    assert ch.trained("shapes") == {
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
    }
    if "vpred" in shapes_variants():
        assert ch.trained("shapes:vpred") == VPRED
    with pytest.raises(ValueError, match="shapes"):
        ch.trained("twin:tiny")


def test_scenarios_name_the_model_the_scheduler_and_the_warning():
    mismatches = ch.mismatch_scenarios(P)
    sweep = ch.sweep_scenarios(P)
    for s in mismatches + sweep:
        check(s)
    assert [s.label for s in mismatches] == list(ch.MISMATCHES)
    first, *others = mismatches
    assert first.notes["warning"] is None and all(s.notes["warning"] for s in others)
    assert others[0].notes["scheduler_config"]["prediction_type"] == "v_prediction"
    assert {s.steps for s in mismatches} == {P.steps}
    assert [(s.notes["model"], s.steps) for s in sweep] == [
        (m, s) for m in ch.models(P) for s in P.sampler_steps
    ]
    # the model as trained at P.steps is one setup, whichever list asks for it
    same = [s for s in sweep if s.source == P.model and s.steps == P.steps]
    assert [s.key for s in same] == [first.key]


@pytest.mark.slow
def test_scenarios_on_shapes_are_scored_and_labelled():
    few = dataclasses.replace(P, quality_images=2, steps=2)
    configs = dict(list(ch.MISMATCHES.items())[:2])
    rows = labkit.measure(ch.mismatch_scenarios(few, configs), progress=False, say=None)
    assert [r["label"] for r in rows] == list(configs)
    assert rows[0]["warning"] is None and "prediction_type" in rows[1]["warning"]
    assert rows[1]["scheduler_config"]["prediction_type"] == "v_prediction"
    assert all(r["status"] == "ok" and r["n"] == 2 and r["sampler"] == "DDIM trailing" for r in rows)
    sweep = labkit.measure(ch.sweep_scenarios(few, [1, 2])[:2], progress=False, say=None)
    assert [(r["model"], r["steps"], r["status"]) for r in sweep] == [
        ("epsilon (shapes)", 1, "ok"),
        ("epsilon (shapes)", 2, "ok"),
    ]
    json.dumps(sweep)  # records are saved as JSON lines


def test_side_by_side_and_training_steps(tiny):
    images, labels = ch.side_by_side({"eps": tiny}, [1], ["a small red circle at the top left"])
    assert images.shape == (1, 64, 64, 3) and labels == ["eps 1"]
    assert (
        ch.training_steps("shapes")
        == json.loads((shapes.MODEL_DIR / "labkit_shapes.json").read_text())["unet_steps"]
    )


@pytest.mark.parametrize(
    "diffs, verdict",
    [
        ([(5, 0.2), (10, 0.3)], "holds"),
        ([(5, 0.2), (10, 0.0)], "holds at [5] steps, same elsewhere"),
        ([(5, -0.2), (10, 0.0)], "does not hold: worse at [5] steps"),
        ([(5, -0.2), (10, 0.2)], "mixed: better at [10], worse at [5] steps"),
        ([(5, 0.01), (10, -0.01)], "not shown: within the noise at every step count"),
    ],
)
def test_compare(diffs, verdict):
    assert ch._compare(diffs, 0.05) == verdict


def _record(model, steps, acc, fid, seconds=1.0, n=100):
    return {
        "model": model,
        "steps": steps,
        "n": n,
        "status": "ok",
        "prompt_accuracy": acc,
        "fid": fid,
        "seconds": seconds,
        "unet_parameters": 10,
        "device": "cpu",
    }


def test_verdict_rows_from_records():
    sweep = [
        _record("eps", 5, 0.50, 40.0),
        _record("eps", 20, 0.90, 10.0),
        _record("v", 5, 0.80, 20.0),
        _record("v", 20, 0.91, 10.5, seconds=1.05),
    ]
    mismatches = [
        {"label": "as trained", "status": "ok", "prompt_accuracy": 0.9, "n": 100},
        {"label": "v", "status": "ok", "prompt_accuracy": 0.1, "n": 100},
        {"label": "cos", "status": "error", "n": 100},
    ]
    rows = ch.verdict_rows(sweep, mismatches, new="v", old="eps")
    assert [r["claim"].split(":")[0] for r in rows] == [
        "better quality at same step count",
        "better quality at same step count",
        "needs a model trained that way",
        "speed",
    ]
    assert rows[0]["verdict"] == "holds at [5] steps, same elsewhere"
    assert rows[1]["verdict"] == "holds at [5] steps, same elsewhere"
    assert rows[2]["verdict"] == "holds"  # both mismatches lost far more than the noise
    assert rows[3]["verdict"] == "holds" and "1.00x" not in rows[3]["measured"]
    empty = ch.verdict_rows([], [], new="v", old="eps")
    assert {r["verdict"] for r in empty} == {"not measured"}


@pytest.mark.skipif("vpred" not in shapes_variants(), reason="the vpred variant is not shipped")
def test_shipped_vpred_variant_keeps_its_training():
    pipe = labkit.load_pipeline("shapes:vpred", device="cpu")
    assert ch._settings(pipe.labkit_scheduler_config) == VPRED == ch.trained("shapes:vpred")
    assert pipe.unet.dtype == torch.float32
    base = labkit.load_pipeline("shapes", device="cpu")
    for a, b in zip(pipe.text_encoder.parameters(), base.text_encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "WARNING" in ch.use_ddim(base, 2, **VPRED)  # vpred's training is not the base's
    size = sum(f.stat().st_size for f in (shapes.VARIANTS_DIR / "vpred").rglob("*") if f.is_file())
    assert size < 12e6
