"""labkit.measurement: the record of a benchmark, FLOP counting, the OOM and NaN paths, part costs.
No timing thresholds here: timings belong in the chapters."""

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import labkit
from labkit import measurement


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

    monkeypatch.setattr(measurement, "generate", out_of_memory)
    result = small_benchmark(tiny, label="too big")
    assert result.record["status"] == "oom" and "out of memory" in result.record["error"]
    assert result.images is None and "out of memory" in repr(result)


def test_nan_images_are_reported(tiny, monkeypatch):
    def nan_images(*args, **kwargs):
        images = np.zeros((1, 64, 64, 3), dtype=np.float32)
        images[0, 0, 0, 0] = np.nan
        return images

    monkeypatch.setattr(measurement, "generate", nan_images)
    record = labkit.benchmark(tiny, steps=2, size=64, repeats=1, flops=False).record
    assert record["status"] == "nan" and record["nan_images"] == 1


def test_image_check():
    images = np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.5), np.full((8, 8, 3), np.nan)])
    assert measurement.image_check(images) == {"nan_images": 1, "black_images": 1}


def test_out_of_memory_in_the_flop_count_keeps_the_timings(tiny, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory while counting")

    monkeypatch.setattr(measurement, "generation_flops", out_of_memory)
    record = small_benchmark(tiny).record
    assert record["status"] == "oom" and "counting" in record["error"]
    assert record["s_per_image"] > 0 and len(record["times_s"]) == 2  # what was measured is kept


def test_utilisation_above_the_peak_is_flagged():
    assert "utilisation_note" not in measurement.utilisation(1e9, 1.0, 10.0)
    out = measurement.utilisation(2e13, 1.0, 10.0)
    assert out["utilisation"] == pytest.approx(2.0) and "above 1" in out["utilisation_note"]


def test_count_flops_by_kind_on_meta():
    with torch.device("meta"):
        layer = torch.nn.Linear(16, 8)
        x = torch.randn(4, 16)
    counts = measurement.count_flops(lambda: layer(x))
    assert counts["flops"] == counts["flops_linear"] == 2 * 4 * 16 * 8
    assert counts["flops_convolution"] == counts["flops_attention"] == 0


def _config(module) -> dict:
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


def test_unet_cost_counts_on_meta_and_times_on_the_device(tiny):
    options = dict(side=8, batch=2, device="cpu", dtype=torch.float32)
    flops_only = measurement.unet_cost(_config(tiny.unet), repeats=0, warmup=0, **options)
    assert flops_only["parameters"] == sum(p.numel() for p in tiny.unet.parameters())
    assert flops_only["flops"] > 0 and "seconds" not in flops_only
    timed = measurement.unet_cost(_config(tiny.unet), repeats=2, warmup=1, **options)
    assert timed["flops"] == flops_only["flops"] and len(timed["times_s"]) == 2


def test_vae_cost_of_both_parts(tiny):
    options = dict(size=64, device="cpu", dtype=torch.float32, warmup=0)
    encode = measurement.vae_cost(_config(tiny.vae), part="encode", repeats=1, **options)
    decode = measurement.vae_cost(_config(tiny.vae), part="decode", repeats=0, **options)
    assert encode["flops"] > 0 and decode["flops"] > 0 and encode["seconds"] > 0
    with pytest.raises(ValueError, match="encode"):
        measurement.vae_cost(_config(tiny.vae), part="both", repeats=0, **options)


def test_compile_seconds_and_break_even():
    eager = {"status": "ok", "warmup_s": 1.0, "warmup": 1, "s_per_image": 1.0, "batch": 1}
    compiled = {"status": "ok", "warmup_s": 11.0, "warmup": 1, "s_per_image": 0.5, "batch": 1}
    assert measurement.compile_seconds(compiled) == pytest.approx(10.5)
    assert measurement.break_even_images(eager, compiled) == pytest.approx(21.0)
    assert measurement.break_even_images(eager, dict(compiled, s_per_image=2.0)) == float("inf")
    assert measurement.compile_seconds({"status": "oom"}) is None
