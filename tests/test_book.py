"""labkit.book: profiles, the start of a chapter, tables of records, judging claims, the verdict box."""

from __future__ import annotations

import json

import pytest
import torch

from labkit import book


def test_ci_profile_is_small_and_on_the_cpu():
    p = book.get_profile("ci")
    assert (p.name, p.device, p.twin, p.model) == ("ci", "cpu", "twin:tiny", "shapes")
    assert p.size <= 64 and p.steps <= 4 and p.repeats >= 2 and not p.compile


def test_gpu_profile_is_real_scale():
    p = book.PROFILES["gpu"]
    assert (p.device, p.twin, p.size) == ("cuda", "twin:sd15", 512)
    assert p.steps == 50 and p.fast_steps == 20 and p.repeats >= 3


@pytest.mark.parametrize(
    ("memory", "expected"), [(None, "ci"), (80.0, "gpu"), (24.0, "gpu"), (16.0, "gpu-small")]
)
def test_auto_picks_by_hardware(monkeypatch, memory, expected):
    monkeypatch.setattr(book, "_cuda_memory_gb", lambda device="cuda": memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: memory is not None)
    assert book.get_profile("auto").name == expected


def test_auto_with_cpu_device_is_ci(monkeypatch):
    monkeypatch.setattr(book, "_cuda_memory_gb", lambda device="cuda": 80.0)
    assert book.get_profile("auto", device="cpu").name == "ci"


def test_device_override_and_unknown_profile(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert book.get_profile("gpu", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="unknown profile"):
        book.get_profile("tpu")


def test_a_gpu_profile_on_a_machine_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="profile gpu runs on a CUDA GPU and none is visible"):
        book.get_profile("gpu")


def test_profile_as_dict_is_json():
    d = book.PROFILES["gpu"].as_dict()
    assert json.loads(json.dumps(d))["batch_sizes"] == [1, 4, 16]


def test_start_chapter_names_the_device(capsys):
    p = book.start_chapter("ci", model="twin:sd15")
    out = capsys.readouterr().out
    assert "profile ci" in out and "device: cpu" in out
    assert p.twin == "twin:sd15"


def test_judge():
    assert book.judge(15, 10, 20) == "holds"
    assert book.judge(5, 10, 20) == "below the claim"
    assert book.judge(30, 10, 20) == "above the claim"
    assert book.judge(0.95, 1.0) == "holds"  # within the 10% tolerance
    assert book.judge(None, 1.0) == "not measured"
    assert book.judge(float("nan"), 1.0) == "not measured"


def test_verdict_renders_as_a_box():
    v = book.verdict(
        [{"claim": "fp16", "claimed": "2x", "measured": "1.1x", "verdict": "below the claim"}], device="cpu"
    )
    assert 'class="admonition' in v._repr_html_() and "below the claim" in v._repr_html_()
    assert "below the claim" in repr(v)
    assert list(v.table().columns) == ["claim", "claimed", "measured", "verdict"]


def test_published_records_and_beside(tmp_path):
    from labkit.records import Store

    assert book.published_records(None) == [] and book.published_records(tmp_path / "missing") == []
    Store(tmp_path).append(
        {"label": "baseline", "s_per_image": 3.4, "device": "NVIDIA H100", "kind": "generate"}
    )
    published = book.published_records(tmp_path)
    table = book.beside_published(
        [{"label": "baseline", "s_per_image": 9.0}], published, ["label", "s_per_image"]
    )
    assert table["run"].tolist() == ["this run", "published"]
    assert table["s_per_image"].tolist() == [9.0, 3.4]


def test_same_setup_uses_the_scenario_key_when_there_is_one():
    assert book.same_setup({"key": "a", "size": 1}, {"key": "a", "size": 2})
    assert not book.same_setup({"key": "a"}, {"key": "b"})
    assert book.same_setup({"source": "s", "size": 64}, {"source": "s", "size": 64, "steps": None})


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


def test_records_table_ratios():
    records = [row("baseline", 4.0, 8.0), row("fast", 1.0, 2.0), {"label": "huge", "status": "oom"}]
    records.append({"label": "xformers", "status": "unavailable", "reason": "not installed"})
    table = book.records_table(records, baseline="baseline")
    assert table["status"][3] == "unavailable" and table["s / image"].isna()[3]
    assert list(table["speed-up"][:2]) == [1.0, 4.0]
    assert list(table["memory ratio"][:2]) == [1.0, 0.25]
    assert table["status"][2] == "oom" and table["speed-up"].isna()[2]
    with pytest.raises(ValueError):
        book.records_table(records, baseline="absent")


def test_status_table_says_why_a_row_has_no_numbers():
    records = [
        row("plain", 2.0, 1.0) | {"size": 64, "memory_cap_gb": None, "measured_under_gb": None},
        row("plain", 2.0, 1.0) | {"size": 64, "memory_cap_gb": 6.0, "measured_under_gb": 4.0},
        {"label": "xf", "status": "unavailable", "reason": "needs a CUDA GPU", "size": 64},
        {"label": "big", "status": "oom", "error": "CUDA out of memory", "size": 64},
    ]
    table = book.status_table(records, baseline="plain")
    assert table["note"].tolist()[1:] == [
        "fits under 4 GB, so under this cap too (not run again)",
        "needs a CUDA GPU",
        "CUDA out of memory",
    ]
    assert table["speed-up"][0] == 1.0


def test_find_fewer_is_better_and_match_margin():
    rows = [{"a": 1, "b": 2}, {"a": 1, "b": 3}]
    assert (
        book.find(rows, a=1) is rows[0] and book.find(rows, b=3) is rows[1] and book.find(rows, a=2) is None
    )
    assert book.fewer_is_better("below the claim").startswith("holds")
    assert book.match_margin(0.5, 100) == pytest.approx(0.05)
    assert book.match_margin(1.0, 100) > 0  # an accuracy of 1 on few images is still uncertain
