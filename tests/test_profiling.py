"""labkit.profiling: the regions of a generation are found and add up sensibly."""

import os

import pytest

from labkit import profiling


def test_time_breakdown_on_the_cpu(tiny):
    original_unet_forward = tiny.unet.forward
    b = profiling.time_breakdown(tiny, steps=2, size=64)
    for region in profiling.REGIONS:
        assert b[f"{region}_s"] > 0, region
    assert b["attention_s"] < b["unet_s"] and 0 < b["attention_share"] < 1
    assert b["wall_s"] > 0
    assert tiny.unet.forward == original_unet_forward  # the labels are removed afterwards
    assert "forward" not in vars(tiny.unet)


def test_union_of_intervals():
    assert profiling._union_us([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4)
    assert profiling._union_us([]) == 0


def test_quiet_stderr_silences_the_file_descriptor(capfd):
    with profiling.quiet_stderr():
        os.write(2, b"profiler_start\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
