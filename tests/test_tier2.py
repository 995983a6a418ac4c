"""The Tier 2 helpers (chapters 4, 5 and 6): the sweep over sizes and memory caps, its table, the
attention-matrix arithmetic, the recommendation, compile cost and break-even, recompilation counts,
and the figures. No timing thresholds: timings belong in the chapters."""

import json
from contextlib import contextmanager

import matplotlib
import pytest
import torch

import labkit
from labkit import measure, plots
from labkit.models import twin_components

matplotlib.use("Agg")

TIER1 = [("dpm_solver", {"steps": 2}), "sdpa"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA GPU")


def tiny_loader(tiny, calls=None):
    def load():
        if calls is not None:
            calls.append(1)
        return tiny

    return load


def run_sweep(load, configs, **kwargs):
    options = dict(sizes=[64], steps=2, repeats=1, warmup=1)
    return measure.sweep(load, configs, **(options | kwargs))


# --------------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------------


@NO_GPU
def test_sweep_measures_and_reports_unavailable_configurations(tiny):
    calls, said = [], []
    records = run_sweep(
        tiny_loader(tiny, calls),
        {"tier 1": TIER1, "offload": TIER1 + ["model_cpu_offload"]},
        sizes=[64, 128],
        say=said.append,
    )
    assert [(r["label"], r["size"], r["status"]) for r in records] == [
        ("tier 1", 64, "ok"),
        ("tier 1", 128, "ok"),
        ("offload", 64, "unavailable"),
        ("offload", 128, "unavailable"),
    ]
    assert len(calls) == 1, "a configuration that cannot run here is not loaded"
    assert "CUDA" in records[2]["reason"] and records[2]["device"]
    assert said == [f"unavailable: offload: {records[2]['reason']}"]
    ok = records[0]
    assert ok["memory_cap_gb"] is None and ok["measured_under_gb"] is None and ok["s_per_image"] > 0
    json.dumps(records)  # records are plain JSON


@NO_GPU
def test_sweep_reports_an_option_found_unavailable_when_applied(tiny):
    said = []
    records = run_sweep(tiny_loader(tiny), {"pinned": [("sdpa", {"backend": "efficient"})]}, say=said.append)
    assert records[0]["status"] == "unavailable" and "CUDA" in records[0]["reason"]
    assert said and said[0].startswith("unavailable: pinned: ")


def test_sweep_with_breakdown_adds_attention_share(tiny):
    (record,) = run_sweep(tiny_loader(tiny), {"tier 1": TIER1}, breakdown=True)
    assert record["status"] == "ok" and 0 < record["attention_share"] < 1
    assert record["attention_s"] > 0 and record["unet_s"] > 0


def test_sweep_turns_a_failure_into_an_error_record(tiny):
    def broken(pipe):
        def fail(*args, **kwargs):
            raise RuntimeError("No available kernel. Aborting execution.")

        pipe.vae.decode = fail

    (record,) = run_sweep(tiny_loader(tiny), {"pinned": TIER1}, prepare=broken)
    assert record["status"] == "error" and record["error"].startswith("No available kernel")
    assert measure.status_table([record])["note"][0].startswith("No available kernel")


def test_sweep_caps_run_from_small_to_large_and_reuse_a_fit(tiny, monkeypatch):
    """Under a fake cap: 'big' runs out of memory under 4 GB, fits under 6; 'small' fits under 4."""
    current = {}

    @contextmanager
    def fake_cap(gigabytes, device="cuda"):
        current["cap"] = gigabytes
        yield
        current.pop("cap")

    real_benchmark = measure.benchmark

    def fake_benchmark(pipe, **kwargs):
        result = real_benchmark(pipe, **kwargs)
        needs = 5.0 if kwargs["label"] == "big" else 1.0
        if current.get("cap", float("inf")) < needs:
            result.record |= {"status": "oom", "error": "CUDA out of memory. Tried to allocate 1 GiB"}
        result.record["runs"] = 1
        return result

    monkeypatch.setattr(measure, "memory_cap", fake_cap)
    monkeypatch.setattr(measure, "benchmark", fake_benchmark)
    records = run_sweep(tiny_loader(tiny), {"small": TIER1, "big": TIER1}, caps=[None, 6.0, 4.0])
    table = [(r["label"], r["memory_cap_gb"], r["status"], r["measured_under_gb"]) for r in records]
    assert table == [
        ("small", 4.0, "ok", 4.0),
        ("small", 6.0, "ok", 4.0),  # not run again: copied from the 4 GB run
        ("small", None, "ok", 4.0),
        ("big", 4.0, "oom", 4.0),
        ("big", 6.0, "ok", 6.0),
        ("big", None, "ok", 6.0),
    ]
    assert "fits under 4 GB" in measure.status_table(records)["note"][1]


# --------------------------------------------------------------------------------------------------
# tables and the recommendation
# --------------------------------------------------------------------------------------------------


def fake(label, status="ok", s=1.0, gb=2.0, size=512, cap=None, **more):
    r = {"label": label, "status": status, "size": size, "memory_cap_gb": cap, "measured_under_gb": cap}
    r |= {"batch": 1, "warmup": 1, "device": "test GPU"}
    if status == "ok":
        r |= {"s_per_image": s, "s_per_image_min": s, "s_per_image_max": s, "warmup_s": 2 * s}
        r |= {"peak_allocated_gb": gb, "peak_reserved_gb": gb + 0.1}
    elif status == "oom":
        r["error"] = "CUDA out of memory. Tried to allocate 2.00 GiB"
    elif status == "unavailable":
        r["reason"] = "needs a CUDA GPU"
    return r | more


def test_status_table_shows_every_status():
    records = [
        fake("base", s=2.0),
        fake("faster", s=1.0),
        fake("too big", "oom"),
        fake("elsewhere", "unavailable"),
    ]
    table = measure.status_table(records, baseline="base", extra=("attention_share",))
    assert list(table["status"]) == ["ok", "ok", "oom", "unavailable"]
    assert table["speed-up"][1] == pytest.approx(2.0)
    assert table["note"][2].startswith("CUDA out of memory") and table["note"][3] == "needs a CUDA GPU"
    assert "GPU memory cap (GB)" not in table.columns and "attention_share" in table.columns
    assert "speed-up" not in measure.status_table(records).columns


def test_recommend_picks_the_fastest_that_fits_per_cap_and_size():
    records = [
        fake("plain", "oom", cap=4.0),
        fake("offload", s=1.7, cap=4.0),
        fake("sequential", s=7.0, cap=4.0),
        fake("plain", s=0.9, cap=None),
        fake("offload", s=1.7, cap=None),
        fake("plain", "oom", cap=2.0, size=1024),
    ]
    table = measure.recommend(records, device_gb=80)
    assert list(table["GPU memory"]) == ["2 GB", "4 GB", "no cap (80 GB)"]
    assert list(table["recommended"]) == ["nothing fits", "offload", "plain"]
    assert list(table["configurations that fit"]) == ["0 of 1", "2 of 3", "2 of 2"]


def test_compile_cost_and_break_even():
    eager = fake("eager", s=1.0, warmup_s=1.5)  # 0.5 s of first-call overhead
    compiled = fake("compiled", s=0.5, warmup_s=60.5)  # 60 s of compile
    assert measure.compile_seconds(eager) == pytest.approx(0.5)
    assert measure.compile_seconds(compiled) == pytest.approx(60.0)
    assert measure.break_even_images(eager, compiled) == pytest.approx(119.0)  # 59.5 s / 0.5 s
    assert measure.break_even_images(eager, fake("slower", s=2.0)) == float("inf")
    assert measure.break_even_images(eager, fake("none", "oom")) is None
    batch = fake("batch 4", s=0.25, batch=4, warmup_s=3.0)  # a call takes 1 s
    assert measure.compile_seconds(batch) == pytest.approx(2.0)
    table = measure.compile_table([eager, compiled, fake("x", "unavailable")], reference="eager")
    assert table["break-even images"][1] == pytest.approx(119.0)
    assert table["speed-up"][1] == pytest.approx(2.0) and table["note"][2] == "needs a CUDA GPU"


def test_unavailable_record():
    r = measure.unavailable_record("compile", "compile=False", size=64)
    assert r == {"label": "compile", "status": "unavailable", "reason": "compile=False", "size": 64}


# --------------------------------------------------------------------------------------------------
# attention arithmetic
# --------------------------------------------------------------------------------------------------


def test_attention_scores_of_the_sd15_unet():
    unet = twin_components("sd15", device="meta")["unet"].to(torch.float16)
    a = measure.attention_scores_gb(unet, 1024, slice_size="auto")
    assert (a["tokens"], a["heads"], a["rows"], a["slice_rows"]) == (128 * 128, 8, 16, 4)
    assert a["full_gb"] == pytest.approx(2 * 16 * 16384**2 * 2 / 1e9)  # scores and softmax, fp16
    assert a["sliced_gb"] == pytest.approx(a["full_gb"] / 4)
    small = measure.attention_scores_gb(unet, 512, batch=2, guidance=False)
    assert small["tokens"] == 64 * 64 and small["rows"] == 16 and small["sliced_gb"] == small["full_gb"]


def test_attention_scores_of_the_tiny_unet(tiny):
    a = measure.attention_scores_gb(tiny.unet, 128, slice_size=1)
    assert a["tokens"] == 16 * 16 and a["slice_rows"] == 1 and a["full_gb"] > a["sliced_gb"] > 0


# --------------------------------------------------------------------------------------------------
# compilation: inputs, pieces, recompilation counts
# --------------------------------------------------------------------------------------------------


def test_compile_pieces_run(tiny):
    unet, make = measure.compile_piece(tiny.unet, "unet")
    args, kwargs = make(64, 1)
    with torch.inference_mode():
        assert unet(*args, **kwargs).sample.shape == (2, 4, 8, 8)  # CFG doubles the batch
    block, make = measure.compile_piece(tiny.unet, "block")
    args, kwargs = make(128, 2)
    with torch.inference_mode():
        assert block(*args, **kwargs).shape == args[0].shape == (4, 256, 32)
    with pytest.raises(ValueError):
        measure.compile_piece(tiny.unet, "vae")


def test_unet_inputs_for_sdxl_hold_the_added_conditions():
    unet = twin_components("sdxl", device="meta")["unet"]
    args, kwargs = measure.unet_inputs(unet, 1024, 1)
    assert args[0].shape == (2, 4, 128, 128) and args[2].shape == (2, 77, 2048)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)


def test_recompilations_count_new_graphs(tiny):
    block, make = measure.compile_piece(tiny.unet, "block")
    records = measure.recompilations(
        block, make, [(64, 1), (64, 1), (128, 1)], {"static": {"dynamic": False}}
    )
    assert [r["new_graphs"] for r in records] == [1, 0, 1]
    assert all(r["label"] == "static" and r["module"] == "BasicTransformerBlock" for r in records)
    assert all(r["first_call_s"] > 0 and r["second_call_s"] > 0 for r in records)
    json.dumps(records)


def test_regional_recompilation_compiles_only_the_blocks(tiny):
    unet, make = measure.compile_piece(tiny.unet, "unet")
    (record,) = measure.recompilations(unet, make, [(64, 1)], {"regional": {"regional": True}})
    assert record["new_graphs"] >= 1 and record["module"] == "UNet2DConditionModel"
    assert not hasattr(tiny.unet, "_orig_mod"), "the module itself is left uncompiled"


# --------------------------------------------------------------------------------------------------
# plots and the quiet profiler
# --------------------------------------------------------------------------------------------------


def mixed_records():
    return [
        fake("tier 1", s=1.0, cap=4.0),
        fake("tier 1", s=1.0, cap=None, measured_under_gb=4.0),
        fake("slicing", "oom", cap=4.0),
        fake("slicing", s=2.0, cap=None),
        fake("offload", "unavailable", cap=4.0),
        fake("offload", "unavailable", cap=None),
    ]


def test_tier2_plots_draw_every_status():
    records = mixed_records()
    fig = plots.fit_map(records)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "out of\nmemory" in texts and "unavailable\nhere" in texts
    assert any("as under 4 GB" in t for t in texts)
    plots.grouped_bars(records, "s_per_image", by="memory_cap_gb")
    plots.grouped_bars(records, "peak_allocated_gb")
    plots.fit_map([])
    compiled = [fake("eager", s=1.0), fake("compiled", s=0.5, warmup_s=30.5), fake("x", "unavailable")]
    fig = plots.break_even(compiled, "eager")
    assert len(fig.axes[0].lines) == 2
    plots.break_even([fake("x", "unavailable")], "eager")
    matplotlib.pyplot.close("all")


def test_the_tiny_pipeline_still_generates_after_a_sweep(tiny):
    run_sweep(tiny_loader(tiny), {"tier 1": TIER1})
    assert labkit.generate(tiny, steps=1, size=64).shape == (1, 64, 64, 3)
