"""labkit.devices: one device name, one environment record, CUDA indices, memory caps refused where impossible."""

import pytest
import torch

from labkit import devices


def test_device_name_of_the_cpu_names_its_cores():
    name = devices.device_name("cpu")
    assert name.endswith(" cores") and name == devices.environment("cpu")["device"]


def test_environment_holds_versions_and_time():
    env = devices.environment("cpu")
    for key in ("device", "torch", "diffusers", "transformers", "labkit", "python", "time"):
        assert env[key], key


def test_resolve_device_refuses_what_is_not_here(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        devices.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gets_an_index():
    assert devices.resolve_device("cuda").index is not None


def test_memory_caps_need_a_gpu_and_a_positive_size():
    assert devices.cap_problem(None) is None
    assert "positive" in devices.cap_problem(0, "cpu")
    if not torch.cuda.is_available():
        assert "CUDA GPU" in devices.cap_problem(4, "cpu")
        with pytest.raises(ValueError, match="CUDA GPU"):
            with devices.memory_cap(4, "cpu"):
                pass


def test_peak_memory_is_none_on_a_cpu():
    assert devices.peak_memory("cpu") == {"peak_allocated_gb": None, "peak_reserved_gb": None}
