"""labkit.scale: prompts split across processes, gathered in order; the ``labkit scale`` command."""

from __future__ import annotations

import numpy as np
import pytest

from labkit import scale
from labkit.cli import main

PROMPTS = ["a red circle at the top left", "a small blue square", "a big green triangle"]
STEPS = 2


def test_seeds_for_defaults_and_checks():
    assert scale.seeds_for(PROMPTS) == [0, 1, 2]
    assert scale.seeds_for(PROMPTS, seed=10) == [10, 11, 12]
    assert scale.seeds_for(PROMPTS, [5, 6, 7]) == [5, 6, 7]
    with pytest.raises(ValueError, match="one seed per prompt"):
        scale.seeds_for(PROMPTS, [1])


def test_launch_command_cpu_and_gpu():
    cpu = scale.launch_command(["--source", "shapes"], processes=2, cpu=True, port=1234)
    assert cpu[1:3] == ["-m", "accelerate.commands.launch"]
    assert cpu[cpu.index("labkit.cli") - 1 : cpu.index("labkit.cli") + 2] == ["-m", "labkit.cli", "scale"]
    # accelerate 1.x's --cpu --num_processes 2 starts one process: several come from --multi_gpu, and
    # --cpu goes to our command, not to the launcher
    assert "--multi_gpu" in cpu and "--cpu" in cpu
    assert cpu.index("--cpu") > cpu.index("scale")
    assert cpu[cpu.index("--num_processes") + 1] == "2"
    assert cpu[cpu.index("--main_process_port") + 1] == "1234"
    gpu = scale.launch_command(["--source", "shapes"], processes=4, cpu=False)
    assert "--multi_gpu" in gpu and "--cpu" not in gpu
    assert "--multi_gpu" not in scale.launch_command([], processes=1, cpu=False)


def test_no_prompts_is_a_clear_error():
    with pytest.raises(ValueError, match="no prompts"):
        scale.generate_split("twin:tiny", [], cpu=True)


def test_single_process_run_keeps_order_and_seeds(tmp_path):
    images, records = scale.generate_split("twin:tiny", PROMPTS[:2], [3, 4], steps=1, cpu=True)
    assert images.shape[0] == 2 and images.ndim == 4
    assert [r["index"] for r in records] == [0, 1]
    assert [r["seed"] for r in records] == [3, 4]
    assert {r["num_processes"] for r in records} == {1}
    assert {r["device"] for r in records} == {"cpu"}  # not "cpu:0": see generate_split
    # an image depends on its own seed only, not on its place in the list
    again, _ = scale.generate_split("twin:tiny", PROMPTS[1:2], [4], steps=1, cpu=True)
    np.testing.assert_array_equal(again[0], images[1])
    out = scale.save(tmp_path / "run", images, records)
    np.testing.assert_array_equal(np.load(out / "images.npy"), images)
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


def test_the_scale_command_writes_images_and_records(tmp_path):
    args = ["scale", "--source", "twin:tiny", "--prompt", "a", "--prompt", "b", "--steps", "1", "--cpu"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert np.load(tmp_path / "images.npy").shape[0] == 2
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2


def test_the_scale_command_checks_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["scale", "--out", "x"])  # no --prompt
    assert "--prompt" in capsys.readouterr().err


def _records(processes: list[int], seconds: float = 1.0) -> list[dict]:
    n = len(set(processes))
    return [
        {"index": i, "process": p, "seconds": seconds, "num_processes": n, "device": "cpu"}
        for i, p in enumerate(processes)
    ]


def test_images_per_second_uses_the_busiest_process():
    assert scale.images_per_second(_records([0, 0, 0, 0])) == pytest.approx(1.0)
    assert scale.images_per_second(_records([0, 0, 1, 1])) == pytest.approx(2.0)
    assert scale.images_per_second(_records([0, 0, 0, 1])) == pytest.approx(4 / 3)


@pytest.mark.slow
@pytest.mark.spawns
def test_two_cpu_processes_equal_one_in_order(tmp_path):
    """Spawns `accelerate launch` with 2 CPU processes on the shapes model (about 30-60 s here)."""
    images, records = scale.run_launched(tmp_path / "two", "shapes", PROMPTS, steps=STEPS, processes=2)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == PROMPTS
    assert {r["num_processes"] for r in records} == {2}
    assert [r["process"] for r in records] == [0, 0, 1]  # contiguous shares, gathered in order
    single, _ = scale.generate_split("shapes", PROMPTS, steps=STEPS, cpu=True, threads=1)
    np.testing.assert_array_equal(images, single)
