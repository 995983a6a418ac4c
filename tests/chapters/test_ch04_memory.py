"""Chapter 4, memory: its scenarios and caps, the attention-matrix arithmetic, the recommendation, the
verdict rows. The sweep itself (caps smallest first, a fit copied to larger caps) is the harness's:
tests/test_scenarios.py."""

from __future__ import annotations

import pytest
import torch

from labkit.book import PROFILES
from labkit.chapters import ch04_memory as ch
from labkit.models import twin_components
from labkit.scenarios import check, measure

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA GPU")


@pytest.mark.parametrize("name", ["ci", "gpu"])
def test_the_scenarios_are_valid_and_distinct(name):
    P = PROFILES[name]
    sweep, batched = ch.sweep_scenarios(P), ch.batch_scenarios(P)
    for scenario in sweep + batched:
        check(scenario)
    assert len({s.key for s in sweep + batched}) == len(sweep) + len(batched)
    assert list(dict.fromkeys(s.label for s in sweep)) == list(ch.configs(P))
    assert {s.size for s in sweep} == {P.size, P.large_size}
    assert all(s.source == P.twin and s.dtype == P.half_dtype and s.steps == P.fast_steps for s in sweep)
    caps = [s.memory_cap_gb for s in sweep if s.label == "tier 1" and s.size == P.size]
    assert caps == ch.caps(P)  # smallest first, then no cap
    assert [(s.label, s.batch) for s in batched] == [
        ("tier 1", P.batch_sizes[-1]),
        ("+ VAE slicing", P.batch_sizes[-1]),
    ]


def test_caps_follow_the_profile():
    assert ch.caps(PROFILES["ci"]) == [None]
    assert ch.caps(PROFILES["gpu"]) == [4.0, 6.0, None]


def test_published_capped_finds_the_sweep_under_any_profile():
    gpu = {(s.label, s.size, s.memory_cap_gb): s for s in ch.sweep_scenarios(PROFILES["gpu"])}
    capped = gpu[("sequential offload", 512, 4.0)]
    uncapped = gpu[("sequential offload", 512, None)]
    published = [
        {"key": capped.key, "label": "first measured as something else", "memory_cap_gb": 4.0},
        {"key": uncapped.key, "label": "sequential offload", "memory_cap_gb": None},
        {"key": "0123456789abcdef", "label": "another chapter's", "memory_cap_gb": 4.0},
        {"label": "a record without a key"},
    ]
    assert ch.published_capped(published) == [{**published[0], "label": "sequential offload"}]


@NO_GPU
def test_offloading_is_unavailable_on_a_cpu(tmp_path):
    P = PROFILES["ci"]
    wanted = {("tier 1", P.size), ("model offload", P.size)}
    work = [s.but(repeats=1, warmup=0) for s in ch.sweep_scenarios(P) if (s.label, s.size) in wanted]
    plain, offload = measure(work, tmp_path, device="cpu", say=None)
    assert plain["status"] == "ok" and plain["memory_cap_gb"] is None and plain["s_per_image"] > 0
    assert offload["status"] == "unavailable" and offload["size"] == P.size
    assert offload["reason"] == "model_cpu_offload: needs a CUDA GPU; none is visible here"


# --------------------------------------------------------------------------------------------------
# attention arithmetic
# --------------------------------------------------------------------------------------------------


def test_attention_scores_of_the_sd15_unet():
    unet = twin_components("sd15", device="meta")["unet"].to(torch.float16)
    a = ch.attention_scores_gb(unet, 1024, slice_size="auto")
    assert (a["tokens"], a["heads"], a["rows"], a["slice_rows"]) == (128 * 128, 8, 16, 4)
    assert a["full_gb"] == pytest.approx(2 * 16 * 16384**2 * 2 / 1e9)  # scores and softmax, fp16
    assert a["sliced_gb"] == pytest.approx(a["full_gb"] / 4)
    small = ch.attention_scores_gb(unet, 512, batch=2, guidance=False)
    assert small["tokens"] == 64 * 64 and small["rows"] == 16 and small["sliced_gb"] == small["full_gb"]


def test_attention_scores_of_the_tiny_unet(tiny):
    a = ch.attention_scores_gb(tiny.unet, 128, slice_size=1)
    assert a["tokens"] == 16 * 16 and a["slice_rows"] == 1 and a["full_gb"] > a["sliced_gb"] > 0


def test_attention_table_of_the_profile():
    P = PROFILES["ci"]
    table = ch.attention_table(P)
    assert list(table.index) == [P.size, P.large_size]
    assert "GB, classic (all heads)" in table.columns and "rows per slice" in table.columns
    assert (table["GB, classic (all heads)"] >= table["GB, sliced (one slice)"]).all()


# --------------------------------------------------------------------------------------------------
# records: the slicing cost, the recommendation, the verdict
# --------------------------------------------------------------------------------------------------


def fake(label, status="ok", s=1.0, gb=2.0, size=512, cap=None, **more):
    r = {"label": label, "status": status, "size": size, "memory_cap_gb": cap, "measured_under_gb": cap}
    r |= {"batch": 1, "warmup": 1, "device": "test GPU"}
    if status == "ok":
        r |= {"s_per_image": s, "peak_allocated_gb": gb, "peak_reserved_gb": None if gb is None else gb + 0.1}
    elif status == "oom":
        r["error"] = "CUDA out of memory. Tried to allocate 2.00 GiB"
    elif status == "unavailable":
        r["reason"] = "needs a CUDA GPU"
    return r | more


def test_recommend_picks_the_fastest_that_fits_per_cap_and_size():
    records = [
        fake("plain", "oom", cap=4.0),
        fake("offload", s=1.7, cap=4.0),
        fake("sequential", s=7.0, cap=4.0),
        fake("plain", s=0.9, cap=None),
        fake("offload", s=1.7, cap=None),
        fake("plain", "oom", cap=2.0, size=1024),
    ]
    table = ch.recommend(records, device_gb=80)
    assert list(table["GPU memory"]) == ["2 GB", "4 GB", "no cap (80 GB)"]
    assert list(table["recommended"]) == ["nothing fits", "offload", "plain"]
    assert list(table["configurations that fit"]) == ["0 of 1", "2 of 3", "2 of 2"]
    assert list(ch.recommend(records[3:5])["GPU memory"]) == ["no cap"]


def test_slicing_lines():
    records = [
        fake("tier 1", s=1.0, gb=2.0),
        fake("+ attention slicing", s=1.5, gb=1.0),
        fake("tier 1", s=2.0, gb=None, size=1024),
        fake("+ attention slicing", "oom", size=1024),
    ]
    assert ch.slicing_lines(records, [512, 1024]) == [
        "512 px: attention slicing takes 1.50x the time, 0.50x the peak memory",
        "1024 px: tier 1 ok, with slicing oom",
    ]


def gpu_records():
    """A GPU-like sweep at 512 and 1024 px under 4 and 6 GB caps and without a cap."""
    records = []
    for size in (512, 1024):
        records += [
            fake(ch.GUIDE, "oom" if size == 1024 else "ok", s=3.0, gb=2.5, size=size, cap=4.0),
            fake(ch.GUIDE, s=3.0, gb=5.0, size=size, cap=6.0),
            fake("tier 1", s=1.0, gb=3.0, size=size, cap=4.0),
            fake("tier 1", s=1.0, gb=3.0, size=size, cap=6.0),
            fake("tier 1", s=1.0, gb=3.0, size=size),
            fake("+ attention slicing", s=1.5, gb=2.0 if size == 512 else 4.0, size=size),
        ]
    return records


def test_verdict_rows_on_a_gpu():
    rows = ch.verdict_rows(gpu_records(), PROFILES["gpu"])
    assert [r["claim"] for r in rows[:4]] == [
        "runs on a 4 GB GPU, 512 px (the guide's three switches)",
        "runs on a 6 GB GPU, 512 px (the guide's three switches)",
        "runs on a 4 GB GPU, 1024 px (the guide's three switches)",
        "runs on a 6 GB GPU, 1024 px (the guide's three switches)",
    ]
    assert [r["verdict"] for r in rows] == [
        "holds",
        "holds",
        "does not hold: oom under 4 GB",
        "holds",
        "holds",  # 33% less peak memory
        "below the claim",  # more memory with slicing
    ]
    assert rows[2]["measured"].startswith("guide's: oom; tier 1 alone: fits (1 s/image")
    assert rows[4]["measured"] == "33% less peak memory, 1.50x the time"


def test_verdict_rows_on_a_cpu():
    P = PROFILES["ci"]
    records = []
    for size in (P.size, P.large_size):
        records += [
            fake(ch.GUIDE, "unavailable", size=size),
            fake("tier 1", s=1.0, gb=None, size=size),
            fake("+ attention slicing", s=1.2, gb=None, size=size),
        ]
    rows = ch.verdict_rows(records, P)
    assert len(rows) == 6
    assert all(r["verdict"] == "not measurable on this device" for r in rows)
    assert (
        rows[0]["measured"]
        == "guide's: no memory cap on this device; tier 1 alone: no memory cap on this device"
    )
    assert rows[-1]["measured"] == "no GPU memory on this device"
