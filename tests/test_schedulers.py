"""labkit.schedulers (chapter 8) and the shapes variants that load as ``shapes:NAME``."""

import json
import shutil

import pytest
import torch

import labkit
from labkit import schedulers, shapes
from labkit.models import SourceError, shapes_variants


def test_the_guides_snippets_are_caught_not_raised():
    rows = schedulers.try_snippets(shapes.MODEL_DIR)
    by = {r["snippet"]: r for r in rows}
    for snippet in schedulers.GUIDE_SNIPPETS:  # "cosine" is not a diffusers name
        assert not by[snippet]["ok"] and "NotImplementedError" in by[snippet]["outcome"]
    fixed = by['DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")']
    assert fixed["ok"] and "clip_sample=True" in fixed["outcome"]  # class defaults, not the model's
    assert rows[0]["ok"] and "clip_sample=False" in rows[0]["outcome"]  # the model's own config


def test_terminal_snr_of_the_schedules():
    rows = {r["schedule"].split(" ")[0] + str(i): r for i, r in enumerate(schedulers.schedule_table())}
    linear, cosine, zero = rows.values()
    assert linear["SNR at t=999"] == pytest.approx(0.0047, abs=2e-4)
    assert 0 < cosine["SNR at t=999"] < 1e-6
    assert zero["SNR at t=999"] == 0.0
    assert all(r["SNR at t=0"] > r["SNR at t=500"] > r["SNR at t=999"] for r in (linear, cosine))


def test_use_ddim_keeps_the_training_and_warns_on_a_mismatch(tiny):
    tiny.labkit_trained = {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
    }
    what = schedulers.use_ddim(tiny, 7)
    config = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "DDIMScheduler" and "WARNING" not in what
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing" and tiny.labkit_call["steps"] == 7
    what = schedulers.use_ddim(tiny, 7, prediction_type="epsilon", rescale_betas_zero_snr=False)
    assert "WARNING" in what and "prediction_type='v_prediction'" in what
    assert "rescale_betas_zero_snr=True" in what


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
    assert schedulers._compare(diffs, 0.05) == verdict


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
    rows = schedulers.verdict_rows(sweep, mismatches, new="v", old="eps")
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
    empty = schedulers.verdict_rows([], [], new="v", old="eps")
    assert {r["verdict"] for r in empty} == {"not measured"}


def test_sweeps_on_shapes_are_scored_and_labelled():
    pipe = labkit.load_pipeline("shapes", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    configs = dict(list(schedulers.MISMATCHES.items())[:2])
    rows = schedulers.mismatch_sweep(pipe, steps=2, n=2, configs=configs)
    assert [r["label"] for r in rows] == list(configs)
    assert rows[0]["warning"] is None and "prediction_type" in rows[1]["warning"]
    assert rows[1]["scheduler_config"]["prediction_type"] == "v_prediction"
    sweep = schedulers.step_sweep({"eps": pipe}, [1, 2], n=2)
    assert [(r["model"], r["steps"], r["status"]) for r in sweep] == [("eps", 1, "ok"), ("eps", 2, "ok")]
    json.dumps(sweep)  # records are saved as JSON lines
    images, labels = schedulers.side_by_side({"eps": pipe}, [1], ["a small red circle at the top left"])
    assert images.shape == (1, 64, 64, 3) and labels == ["eps 1"]
    assert (
        schedulers.training_steps("shapes")
        == json.loads((shapes.MODEL_DIR / "labkit_shapes.json").read_text())["unet_steps"]
    )


def test_ship_a_variant_and_load_it(tmp_path, monkeypatch):
    trained = tmp_path / "trained"
    shutil.copytree(shapes.MODEL_DIR, trained)
    variants = tmp_path / "variants"
    monkeypatch.setattr(shapes, "VARIANTS_DIR", variants)
    (variants / "vae").mkdir(parents=True)  # a VAE variant is not a pipeline variant
    dest = schedulers.ship_variant(trained, "mine")
    assert dest == variants / "mine" and shapes_variants() == ["mine"]
    assert json.loads((dest / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "DDIMScheduler"
    )
    pipe = labkit.load_pipeline("shapes:mine", device="cpu")
    assert pipe.unet.dtype == torch.float32  # stored fp16, upcast
    assert pipe.labkit_source == "shapes:mine" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(SourceError, match="'shapes:mine'"):
        labkit.load_pipeline("shapes:nope", device="cpu")
    # a variant must share the shipped text encoder and VAE
    from safetensors.torch import load_file, save_file

    path = next((trained / "text_encoder").glob("*.safetensors"))
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    with pytest.raises(ValueError, match="text_encoder"):
        schedulers.ship_variant(trained, "other")


@pytest.mark.skipif("vpred" not in shapes_variants(), reason="the vpred variant is not shipped")
def test_shipped_vpred_variant():
    pipe = labkit.load_pipeline("shapes:vpred", device="cpu")
    assert pipe.labkit_trained == {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
    }
    assert pipe.unet.dtype == torch.float32
    base = labkit.load_pipeline("shapes", device="cpu")
    assert base.labkit_trained["rescale_betas_zero_snr"] is False
    for a, b in zip(pipe.text_encoder.parameters(), base.text_encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match="trained with"):
        labkit.tiers.custom_scheduler(base)  # the defaults are vpred's training, not the base's
    size = sum(f.stat().st_size for f in (shapes.VARIANTS_DIR / "vpred").rglob("*") if f.is_file())
    assert size < 12e6
