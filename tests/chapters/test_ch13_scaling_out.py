"""Chapter 13 (scaling out): the runs as scenarios, their records, and the verdict computed from them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import labkit
from labkit import book
from labkit.chapters import ch13_scaling_out as ch
from labkit.scenarios import MEASURERS

CI = book.get_profile("ci")


def test_a_cpu_profile_launches_two_cpu_processes():
    assert ch.gpu_count(CI) == 0
    assert ch.processes(CI) == (2, False)
    assert len(ch.prompts(CI)) == 2 * max(CI.batch_sizes) and ch.prompts(CI) == ch.prompts(CI)


def test_run_scenarios_launched_then_single():
    launched, single = ch.run_scenarios(CI)
    assert launched.kind == single.kind == "scaled_run"
    assert launched.options["processes"] == 2 and single.options["processes"] == 1
    assert launched.options["cpu"] is True
    assert launched.options["prompts"] == single.options["prompts"] == ch.prompts(CI)
    assert launched.steps == single.steps == CI.fast_steps and launched.source == CI.model
    assert launched.key != single.key


def test_the_single_process_run_is_a_record_and_keeps_the_threads():
    threads = torch.get_num_threads()
    scenario = labkit.Scenario(
        kind="scaled_run", source="twin:tiny", steps=1, guidance=7.5, repeats=1, warmup=0,
        options={"prompts": ["a", "b"], "processes": 1, "cpu": True},
    )  # fmt: skip
    record = MEASURERS["scaled_run"].fn(scenario, None, torch.device("cpu"))
    assert torch.get_num_threads() == threads
    assert record["status"] == "ok" and record["num_processes"] == 1 and record["images_per_s"] > 0
    rows = record["per_image"]
    assert [r["index"] for r in rows] == [0, 1] and [r["seed"] for r in rows] == [0, 1]
    assert all(len(r["sha256"]) == 16 for r in rows) and rows[0]["sha256"] != rows[1]["sha256"]
    assert list(ch.order_table(rows)["process"]) == [0, 0]
    assert ch.same_images(record, record)


def _record(processes: list[int], digests: list[str], seconds: float = 1.0, device: str = "cpu") -> dict:
    n = len(set(processes))
    rows = [
        {"index": i, "process": p, "seconds": seconds, "num_processes": n, "device": device, "sha256": d}
        for i, (p, d) in enumerate(zip(processes, digests, strict=True))
    ]
    return {"label": f"{n} processes", "status": "ok", "num_processes": n, "per_image": rows}


def test_verdict_rows_check_order_equality_and_speed():
    digests = ["a", "b", "c", "d"]
    two, one = _record([0, 0, 1, 1], digests), _record([0, 0, 0, 0], digests)
    rows = ch.verdict_rows(two, one, gpus=0)
    assert [r["verdict"] for r in rows[:2]] == ["holds", "holds"]
    assert rows[2]["verdict"] == "not measurable on this device"  # CPU processes, no GPUs
    shuffled = {**two, "per_image": [two["per_image"][1], two["per_image"][0], *two["per_image"][2:]]}
    assert ch.verdict_rows(shuffled, one, gpus=0)[0]["verdict"] == "does not hold"
    other = _record([0, 0, 0, 0], ["x", "b", "c", "d"])
    different = ch.verdict_rows(two, other, gpus=0)[1]
    assert different["verdict"] == "does not hold" and different["measured"].startswith(
        "1 of 4 images differ"
    )
    on_gpus = _record([0, 0, 1, 1], digests, device="cuda:0")
    assert ch.verdict_rows(on_gpus, one, gpus=2)[2]["verdict"] == "holds"  # 2x the images per second
    failed = {"label": "2 processes", "status": "error", "error": "accelerate launch failed (1)"}
    assert {r["verdict"] for r in ch.verdict_rows(failed, one, gpus=0)} == {"not measured"}


@pytest.mark.slow
@pytest.mark.spawns
def test_launched_and_single_runs_make_the_same_images():
    """Spawns `accelerate launch` with 2 CPU processes on the shapes model (about 30-60 s here)."""
    small = dataclasses.replace(CI, batch_sizes=(1,), fast_steps=1)
    run, single = labkit.measure(ch.run_scenarios(small), device="cpu", progress=False, say=None)
    assert run["status"] == single["status"] == "ok", run.get("error")
    assert [r["process"] for r in run["per_image"]] == [0, 1] and run["num_processes"] == 2
    assert ch.same_images(run, single)
    assert [r["verdict"] for r in ch.verdict_rows(run, single, gpus=0)][:2] == ["holds", "holds"]
