"""The result record: structure, FLOP counting, the OOM and NaN paths, results files and tables.
No timing thresholds here: timings belong in the chapters."""

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import labkit
from labkit import measure


def small_benchmark(pipe, **kwargs):
    return labkit.benchmark(pipe, steps=2, size=64, repeats=2, warmup=1, **kwargs)


def test_record_structure(tiny):
    labkit.apply(tiny, "baseline")
    result = small_benchmark(tiny)
    r = result.record
    assert r["status"] == "ok" and r["label"] == "baseline" and r["source"] == "twin:tiny"
    assert r["s_per_image_min"] <= r["s_per_image"] <= r["s_per_image_max"]
    assert len(r["times_s"]) == 2 and r["warmup_s"] > 0
    assert r["steps"] == 2 and r["size"] == 64 and r["batch"] == 1 and r["guidance"] == 7.5
    assert (
        r["dtype"] == "float32" and r["scheduler"] == "PNDMScheduler" and r["attention"] == ["AttnProcessor"]
    )
    assert any(a.startswith("classic_attention") for a in r["applied"])
    for key in ("device", "torch", "diffusers", "transformers", "labkit", "python", "time"):
        assert r[key]
    assert r["nan_images"] == 0 and r["flops_per_image"] > 0 and r["utilisation"] > 0
    assert result.images.shape == (1, 64, 64, 3)
    json.dumps(r)  # a record is plain JSON


def test_flop_extrapolation_matches_a_full_count(tiny):
    """FLOPs are counted on 1- and 2-step runs and extrapolated: check against counting all 3 steps."""
    labkit.apply(tiny, ["dpm_solver"])
    record = labkit.benchmark(tiny, steps=3, size=64, repeats=1, warmup=0).record
    with FlopCounterMode(display=False) as counter:
        labkit.generate(tiny, steps=3, size=64)
    assert record["denoiser_evaluations"] == 3
    assert record["flops_per_image"] == pytest.approx(counter.get_total_flops(), rel=1e-6)


def test_batch_divides_time_and_flops(tiny):
    one = labkit.benchmark(tiny, steps=1, size=64, batch=1, repeats=1, warmup=0).record
    two = labkit.benchmark(tiny, steps=1, size=64, batch=2, repeats=1, warmup=0).record
    assert two["flops_per_image"] == pytest.approx(one["flops_per_image"], rel=0.05)
    assert two["images_per_s"] == pytest.approx(2 / two["times_s"][0])


def test_out_of_memory_is_a_result(tiny, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(measure, "generate", out_of_memory)
    result = small_benchmark(tiny, label="too big")
    assert result.record["status"] == "oom" and "out of memory" in result.record["error"]
    assert result.images is None and "out of memory" in repr(result)


def test_nan_images_are_reported(tiny, monkeypatch):
    def nan_images(*args, **kwargs):
        images = np.zeros((1, 64, 64, 3), dtype=np.float32)
        images[0, 0, 0, 0] = np.nan
        return images

    monkeypatch.setattr(measure, "generate", nan_images)
    record = labkit.benchmark(tiny, steps=2, size=64, repeats=1, flops=False).record
    assert record["status"] == "nan" and record["nan_images"] == 1


def test_image_check():
    images = np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.5), np.full((8, 8, 3), np.nan)])
    assert measure.image_check(images) == {"nan_images": 1, "black_images": 1}


def test_results_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    measure.append_results(path, {"label": "a", "status": "ok"})
    measure.append_results(path, [{"label": "b", "status": "oom"}, {"label": "c", "status": "ok"}])
    assert [r["label"] for r in measure.load_results(path)] == ["a", "b", "c"]
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def row(label, s, gb, status="ok"):
    return {
        "label": label,
        "status": status,
        "s_per_image": s,
        "s_per_image_min": s,
        "s_per_image_max": s,
        "peak_allocated_gb": gb,
        "flops_per_image": 2e12,
        "utilisation": 0.1,
        "device": "test",
    }


def test_results_table_ratios():
    records = [row("baseline", 4.0, 8.0), row("fast", 1.0, 2.0), {"label": "huge", "status": "oom"}]
    records.append({"label": "xformers", "status": "unavailable", "reason": "not installed"})
    table = labkit.results_table(records, baseline="baseline")
    assert table["status"][3] == "unavailable" and table["s / image"].isna()[3]
    assert list(table["speed-up"][:2]) == [1.0, 4.0]
    assert list(table["memory ratio"][:2]) == [1.0, 0.25]
    assert table["status"][2] == "oom" and table["speed-up"].isna()[2]
    with pytest.raises(ValueError):
        labkit.results_table(records, baseline="absent")


def test_plots_draw_from_records():
    from labkit import plots

    records = [row("baseline", 4.0, 8.0), row("fast", 1.0, 2.0), {"label": "huge", "status": "oom"}]
    records.append({"label": "xformers", "status": "unavailable"})
    figure = plots.bar(records)
    assert len(figure.axes[0].patches) == 4
    assert "unavailable" in [t.get_text().strip() for t in figure.axes[0].texts]
    assert plots.tradeoff(records[:2]).axes[0].collections


def test_memory_cap_needs_a_gpu():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            with measure.memory_cap(4):
                pass


def test_doctor_reports_every_optimization_and_preset():
    report = labkit.doctor()
    assert set(report["optimizations"]) == set(labkit.OPTIMIZATIONS)
    assert set(report["presets"]) == set(labkit.PRESETS)
    assert "sd15" in report["sources"]["twins"]
    if not torch.cuda.is_available():
        assert "CUDA" in report["optimizations"]["model_cpu_offload"]
