"""Scenarios and `measure`: a setup is measured once, kept in the store, looked up before any work,
and every failure is a record, never a lost run."""

from __future__ import annotations

import json

import pytest
import torch

import labkit
from labkit import scenarios
from labkit.records import Store
from labkit.scenarios import Scenario, grid, measure, measurer

FAST = dict(source="twin:tiny", size=64, steps=2, repeats=1, warmup=0)


def fast(**changes) -> Scenario:
    return Scenario(**(FAST | changes))


def test_the_key_is_the_setup_without_label_and_notes():
    a = fast(optimizations=("fp16", "dpm_solver:steps=2"), label="a", notes={"x": 1})
    b = fast(optimizations=[("fp16", {}), ("dpm_solver", {"steps": 2})], label="b")
    assert a.key == b.key and a.setup() == b.setup()
    assert a.key != a.but(size=128).key
    assert json.loads(json.dumps(a.setup())) == a.setup()


def test_a_setup_is_measured_once_and_then_comes_from_the_store(tmp_path, monkeypatch):
    builds = []
    real = scenarios.load_pipeline
    monkeypatch.setattr(scenarios, "load_pipeline", lambda *a, **k: builds.append(a) or real(*a, **k))
    base = fast(optimizations=("dpm_solver:steps=2",), label="first")
    records = measure([base, base.but(label="again", notes={"n": 2})], tmp_path, say=None)
    assert [r["label"] for r in records] == ["first", "again"] and records[1]["n"] == 2
    assert records[0]["key"] == records[1]["key"] and len(builds) == 1
    store = Store(tmp_path)
    assert len(store.records()) == 1 and store.records()[0]["scenario"] == base.setup()
    said = []
    again = measure([base.but(label="later")], tmp_path, say=said.append)
    assert len(builds) == 1 and again[0]["s_per_image"] == records[0]["s_per_image"]
    assert said == [f"1 of 1 setups already in the store ({tmp_path.name}/); measuring 0"]


def test_changed_measuring_code_measures_again(tmp_path, monkeypatch):
    base = fast(label="x")
    measure([base], tmp_path, say=None)
    monkeypatch.setattr(scenarios, "code_fingerprint", lambda *files: "another version")
    measure([base], tmp_path, say=None)
    assert len(Store(tmp_path).records()) == 2


def test_samplers_share_one_pipeline_and_other_optimizations_get_their_own(monkeypatch):
    builds = []
    real = scenarios._build
    monkeypatch.setattr(scenarios, "_build", lambda s, d: builds.append(s.label) or real(s, d))
    records = measure(
        [
            fast(optimizations=("ddim:steps=2",), label="ddim"),
            fast(optimizations=("euler:steps=2",), label="euler"),
            fast(optimizations=("euler:steps=2", "bf16"), label="euler bf16"),
        ],
        say=None,
    )
    assert builds == ["ddim", "euler bf16"]
    assert [r["scheduler"] for r in records] == [
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "EulerDiscreteScheduler",
    ]
    assert [r["dtype"] for r in records] == ["float32", "float32", "bfloat16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_what_cannot_run_here_is_an_unavailable_record_with_the_reason(tmp_path):
    records = measure(
        [fast(optimizations=("xformers",), label="xf"), fast(memory_cap_gb=4.0, label="capped")],
        tmp_path,
        say=None,
    )
    assert [r["status"] for r in records] == ["unavailable", "unavailable"]
    assert "CUDA" in records[0]["reason"] and "memory cap needs a CUDA GPU" in records[1]["reason"]
    assert "s_per_image" not in records[0]


def test_failures_are_records(monkeypatch):
    @measurer("boom", pipeline=False)
    def boom(scenario, pipe, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    @measurer("broken", pipeline=False)
    def broken(scenario, pipe, device):
        raise RuntimeError("No available kernel.\nmore")

    try:
        oom, error = measure([Scenario(kind="boom", label="a"), Scenario(kind="broken", label="b")], say=None)
    finally:
        del scenarios.MEASURERS["boom"], scenarios.MEASURERS["broken"]
    assert (oom["status"], error["status"]) == ("oom", "error")
    assert error["error"] == "No available kernel."


def test_an_interrupted_run_keeps_what_it_finished(tmp_path):
    calls = []

    @measurer("count", pipeline=False)
    def count(scenario, pipe, device):
        calls.append(scenario.label)
        if calls == ["first", "second"]:  # Ctrl-C during the second measurement of the first call
            raise KeyboardInterrupt
        return {"value": len(calls)}

    try:
        work = [Scenario(kind="count", label="first", n=1), Scenario(kind="count", label="second", n=2)]
        with pytest.raises(KeyboardInterrupt):
            measure(work, tmp_path, say=None)
        assert [r["label"] for r in Store(tmp_path).records()] == ["first"]
        records = measure(work, tmp_path, say=None)  # the second call finishes the work, and only that
    except KeyboardInterrupt:
        pytest.fail("the second call was interrupted")
    finally:
        del scenarios.MEASURERS["count"]
    assert calls == ["first", "second", "second"] and records[0]["value"] == 1


def test_device_independent_kinds_answer_for_any_device(tmp_path):
    scenario = Scenario(
        kind="unet_cost", source="twin:tiny", repeats=0, options={"unet": _tiny_unet(), "side": 8}
    )
    (record,) = measure([scenario], tmp_path, say=None)
    assert record["flops"] > 0
    path = Store(tmp_path).files()[0]
    path.write_text(path.read_text().replace(record["device"], "Another machine, 64 cores"))
    (again,) = measure([scenario], tmp_path, say=None)
    assert again["device"] == "Another machine, 64 cores" and len(Store(tmp_path).records()) == 1


def _tiny_unet() -> dict:
    return labkit.load_pipeline("twin:tiny").unet.config | {}


def test_bad_scenarios_are_refused_before_any_work(tmp_path):
    for bad, message in [
        (fast(kind="nope"), "unknown scenario kind 'nope'"),
        (fast(source="twin:sd16"), "unknown twin 'twin:sd16'"),
        (fast(source="shapes:nope"), "unknown shapes variant"),
        (fast(steps=0), "steps must be a whole number >= 1"),
        (fast(size=65), "multiple of 8"),
        (fast(batch=0), "batch must be"),
        (fast(guidance=float("nan")), "guidance must be a number"),
        (fast(repeats=0), "repeats >= 1"),
        (fast(memory_cap_gb=0.0), "positive number of GB"),
        (fast(dtype="fp64"), "unknown dtype"),
        (fast(optimizations=("fp16:foo=1",)), "fp16 has no option 'foo'"),
    ]:
        with pytest.raises(ValueError, match=message):
            measure([fast(label="fine"), bad], tmp_path, say=None)
    assert Store(tmp_path).records() == []


def test_memory_caps_reuse_a_fit_under_a_smaller_cap(monkeypatch):
    monkeypatch.setattr(scenarios, "cap_problem", lambda cap, device: None)
    monkeypatch.setattr(scenarios, "memory_cap", lambda cap, device: _nothing())
    work = grid(
        {"plain": ()}, source="twin:tiny", sizes=[64], caps=[None, 6.0, 4.0], steps=2, repeats=1, warmup=0
    )
    records = measure(work, say=None)
    assert [r["memory_cap_gb"] for r in records] == [None, 6.0, 4.0]
    assert [r["measured_under_gb"] for r in records] == [4.0, 4.0, 4.0]
    assert len({r["s_per_image"] for r in records}) == 1


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_grid_is_every_configuration_at_every_size_cap_and_batch():
    work = grid({"a": ("fp16",), "b": ()}, source="twin:tiny", sizes=[64, 128], batches=[1, 2], steps=2)
    assert len(work) == 8 and {s.label for s in work} == {"a", "b"}
    assert {(s.size, s.batch) for s in work} == {(64, 1), (64, 2), (128, 1), (128, 2)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_a_preset_with_a_step_that_cannot_run_is_unavailable_never_ok():
    (record,) = measure([fast(optimizations="tier1", label="tier1")], say=None)
    assert record["status"] == "unavailable" and record["reason"].startswith("swap_vae: ")
