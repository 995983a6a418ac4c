"""Chapter 5, attention: its scenarios, what they measure on a CPU (a pinned backend that needs CUDA is
unavailable; the breakdown gives attention's share), Amdahl's prediction and the verdict rows."""

from __future__ import annotations

import pytest
import torch

from labkit.book import PROFILES
from labkit.chapters import ch05_attention as ch
from labkit.scenarios import check, measure

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA GPU")


@pytest.mark.parametrize("name", ["ci", "gpu"])
def test_the_scenarios_are_valid_and_distinct(name):
    P = PROFILES[name]
    scenarios = ch.scenarios(P)
    for scenario in scenarios:
        check(scenario)
    assert len({s.key for s in scenarios}) == len(scenarios) == 2 * len(ch.configs(P))
    assert list(dict.fromkeys(s.label for s in scenarios)) == [
        "classic attention",
        "SDPA",
        "SDPA flash",
        "SDPA memory-efficient",
        "SDPA math",
        "xFormers",
    ]
    assert all(
        s.breakdown and s.size in (P.size, P.large_size) and s.dtype == P.half_dtype for s in scenarios
    )


@NO_GPU
def test_sdpa_has_an_attention_share_and_a_cuda_only_kernel_is_unavailable(tmp_path):
    P = PROFILES["ci"]
    wanted = ("SDPA", "SDPA memory-efficient")
    work = [s.but(repeats=1, warmup=0) for s in ch.scenarios(P) if s.label in wanted and s.size == P.size]
    sdpa, efficient = measure(work, tmp_path, device="cpu", say=None)
    assert sdpa["status"] == "ok" and 0 < sdpa["attention_share"] < 1
    assert sdpa["attention_s"] > 0 and sdpa["unet_s"] > 0
    assert efficient["status"] == "unavailable" and efficient["size"] == P.size
    assert efficient["reason"] == "sdpa: sdpa(backend='efficient'): needs a CUDA GPU; none is visible here"


def fake(label, status="ok", size=512, *, s=1.0, unet=0.8, attention=0.4, gb=2.0):
    r = {"label": label, "status": status, "size": size, "device": "test GPU"}
    if status == "ok":
        r |= {"s_per_image": s, "unet_s": unet, "attention_s": attention, "peak_allocated_gb": gb}
        r["attention_share"] = attention / unet
    elif status == "unavailable":
        r["reason"] = "xformers: needs a CUDA GPU; none is visible here"
    return r


def test_attention_speedup_follows_amdahl():
    classic = fake("classic attention", unet=1.0, attention=0.5)
    sdpa = fake("SDPA", unet=0.8, attention=0.25)
    a = ch.attention_speedup(classic, sdpa)
    assert a["share"] == 0.5 and a["attention_speedup"] == 2.0
    assert a["predicted"] == pytest.approx(1 / (0.5 + 0.25)) and a["measured"] == pytest.approx(1.25)


def test_speedup_lines():
    records = [
        fake("classic attention", unet=1.0, attention=0.5),
        fake("SDPA", unet=0.8, attention=0.25),
        fake("classic attention", "oom", size=1024),
        fake("SDPA", size=1024),
    ]
    assert ch.speedup_lines(records, [512, 1024]) == [
        "512 px: attention is 50% of UNet time with classic attention; SDPA makes it 2.00x faster, "
        "so the UNet should be 1.33x faster: measured 1.25x",
        "1024 px: classic oom, SDPA ok",
    ]
    with pytest.raises(ValueError, match="SDPA"):
        ch.speedup_lines(records[:1], [512])


def test_verdict_rows_on_a_gpu():
    P = PROFILES["gpu"]
    records = []
    for size in (P.size, P.large_size):
        records += [
            fake("classic attention", size=size, s=2.0, attention=0.9, gb=4.0),
            fake("SDPA", size=size, s=1.5, attention=0.3, gb=2.0),
            fake("xFormers", size=size, s=1.6, attention=0.6, gb=3.8),
        ]
    rows = ch.verdict_rows(records, P)
    assert [r["claim"] for r in rows[:2]] == [
        "xFormers: 2-4x faster attention, 512 px",
        "xFormers: 40-60% less memory, 512 px",
    ]
    assert [r["verdict"] for r in rows] == ["below the claim", "below the claim"] * 2 + ["holds", "holds"] * 2
    assert rows[4]["measured"] == "3.00x (whole image: 1.33x)"
    assert rows[5]["measured"] == "50% (4.00 -> 2.00 GB)"


def test_verdict_rows_on_a_cpu():
    P = PROFILES["ci"]
    records = []
    for size in (P.size, P.large_size):
        records += [
            fake("classic attention", size=size, gb=None),
            fake("SDPA", size=size, attention=0.1, gb=None),
            fake("xFormers", "unavailable", size=size),
        ]
    rows = ch.verdict_rows(records, P)
    assert len(rows) == 8
    assert all(r["verdict"] == "not measured" for r in rows[:4])
    assert rows[0]["measured"] == "xFormers cannot run here: xformers: needs a CUDA GPU; none is visible here"
    assert rows[4]["verdict"] == "holds" and rows[5]["verdict"] == "not measurable on this device"


def test_a_failed_baseline_gives_one_row_per_size():
    records = [fake("classic attention", "error"), fake("SDPA")]
    (row,) = ch.claim_rows(records, "PyTorch SDPA", "SDPA", 512)
    assert row["verdict"] == "not measured" and row["measured"] == "classic: error, PyTorch SDPA: ok"
