"""Every optimization really changes the pipeline and records what it did; missing needs are reported."""

import importlib.util

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

import labkit
from labkit.optimizations import OPTIMIZATIONS, Unavailable, registry
from labkit.optimizations.attention import classic_attention, sdpa
from labkit.optimizations.compilation import channels_last, fuse_qkv, torch_compile
from labkit.optimizations.memory import (
    attention_slicing,
    group_offload,
    model_cpu_offload,
    sequential_cpu_offload,
    vae_slicing,
    vae_tiling,
)
from labkit.optimizations.quantize import fp8_dynamic, weight_bytes
from labkit.optimizations.registry import xformers_problem
from labkit.optimizations.samplers import custom_scheduler, dpm_solver
from labkit.optimizations.swaps import distilled_student, swap_vae

has_torchao = importlib.util.find_spec("torchao") is not None


def processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


@pytest.fixture
def no_cuda_check(monkeypatch):
    """Let the CUDA-only optimizations run on the CPU, to check what they change (offload hooks)."""
    real = registry.missing
    monkeypatch.setattr(
        registry, "missing", lambda need, pipe=None: None if need == "cuda" else real(need, pipe)
    )


@pytest.mark.parametrize(
    "name, scheduler, steps",
    [
        ("pndm", "PNDMScheduler", 50),
        ("ddim", "DDIMScheduler", 50),
        ("dpm_solver", "DPMSolverMultistepScheduler", 20),
        ("euler", "EulerDiscreteScheduler", 30),
        ("ddpm", "DDPMScheduler", 1000),
    ],
)
def test_samplers_swap_the_scheduler_and_set_steps(tiny, name, scheduler, steps):
    change = OPTIMIZATIONS[name].fn(tiny)
    assert type(tiny.scheduler).__name__ == scheduler
    assert tiny.labkit_call["steps"] == steps
    assert change.status == "applied" and scheduler in change.what
    assert tiny.scheduler.config.beta_schedule == "scaled_linear"  # the model's training schedule is kept


def test_dpm_solver_variants(tiny):
    dpm_solver(tiny, karras=True, sde=True, steps=15)
    assert tiny.scheduler.config.algorithm_type == "sde-dpmsolver++"
    assert tiny.scheduler.config.use_karras_sigmas and tiny.labkit_call["steps"] == 15


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision(tiny, name, dtype):
    OPTIMIZATIONS[name].fn(tiny)
    assert tiny.unet.dtype == tiny.vae.dtype == tiny.text_encoder.dtype == dtype


def test_attention_processors(tiny):
    classic_attention(tiny)
    assert processors(tiny) == {AttnProcessor}
    assert {type(p) for p in tiny.vae.attn_processors.values()} == {AttnProcessor}
    sdpa(tiny)
    assert processors(tiny) == {AttnProcessor2_0}
    attention_slicing(tiny)
    assert processors(tiny) == {SlicedAttnProcessor}


def test_sdpa_backend_is_pinned_in_the_unet_only(tiny, monkeypatch):

    sdpa(tiny, backend="math")
    assert {p.backend for p in tiny.unet.attn_processors.values()} == {"math"}
    assert {type(p) for p in tiny.vae.attn_processors.values()} == {AttnProcessor2_0}
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert labkit.generate(tiny, steps=1).shape == (1, 64, 64, 3)
    assert seen and any(seen) and not all(seen)  # pinned in the UNet, free in the VAE
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        sdpa(tiny, backend="fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_only_optimizations_raise_on_a_cpu(tiny):
    for name in ("tf32", "xformers", "model_cpu_offload", "sequential_cpu_offload", "group_offload"):
        with pytest.raises(Unavailable, match="CUDA"):
            OPTIMIZATIONS[name].fn(tiny)
    with pytest.raises(Unavailable, match="CUDA"):
        sdpa(tiny, backend="efficient")
    assert tiny.labkit_applied == []  # nothing half-applied is recorded


def test_xformers_problem_is_explained():
    problem = xformers_problem()
    if importlib.util.find_spec("xformers") is None:
        assert "not installed" in problem and "labkit[xformers]" in problem
    elif not torch.cuda.is_available():
        assert "CUDA" in problem


def test_fuse_qkv(tiny):
    fuse_qkv(tiny)
    assert {type(p).__name__ for p in tiny.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    attention = next(m for m in tiny.unet.modules() if hasattr(m, "fused_projections"))
    assert attention.fused_projections


def test_channels_last(tiny):
    channels_last(tiny)
    assert tiny.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tiny.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_tiling_and_slicing(tiny):
    vae_tiling(tiny)
    vae_slicing(tiny)
    assert tiny.vae.use_tiling and tiny.vae.use_slicing


def test_model_cpu_offload_adds_hooks(tiny, no_cuda_check):
    model_cpu_offload(tiny)
    assert hasattr(tiny.unet, "_hf_hook") and hasattr(tiny.vae, "_hf_hook")


def test_sequential_cpu_offload_adds_hooks(tiny, no_cuda_check):
    sequential_cpu_offload(tiny)
    assert hasattr(tiny.unet.conv_in, "_hf_hook")


def test_group_offload(tiny, no_cuda_check):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    group_offload(tiny, use_stream=False)
    assert _is_group_offload_enabled(tiny.unet)


def test_torch_compile_wraps_the_unet(tiny):
    torch_compile(tiny, mode="default", vae=True)
    assert type(tiny.unet).__name__ == "OptimizedModule"
    assert (
        hasattr(tiny.vae.decode, "_torchdynamo_orig_callable")
        or "torch._dynamo" in type(tiny.vae.decode).__module__
    )


@pytest.mark.skipif(not has_torchao, reason="torchao not installed (pip install 'labkit[quant]')")
@pytest.mark.parametrize("name", ["int8_weight_only", "int8_dynamic"])
def test_int8_quantizes_the_unet_linear_layers(tiny, name):
    before = weight_bytes(tiny.unet)
    OPTIMIZATIONS[name].fn(tiny)
    linear = next(m for m in tiny.unet.modules() if isinstance(m, torch.nn.Linear))
    assert type(linear.weight).__module__.startswith("torchao")
    assert weight_bytes(tiny.unet) < before
    assert labkit.generate(tiny, steps=1).shape == (1, 64, 64, 3)


def test_fp8_needs_a_recent_gpu(tiny):
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable):
            fp8_dynamic(tiny)


def test_custom_scheduler_and_the_guides_cosine(tiny):
    from diffusers import DDIMScheduler

    with pytest.raises(NotImplementedError):  # the guide's snippet, as written
        DDIMScheduler(beta_schedule="cosine", prediction_type="v_prediction")
    with pytest.warns(UserWarning, match="trained with"):
        change = custom_scheduler(tiny)  # tiny was built for epsilon and scaled_linear
    config = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"
    assert config.beta_schedule == "squaredcos_cap_v2" and config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert "WARNING" in change.what


def test_swap_vae(tiny, _tiny_master, tmp_path):
    import copy

    other = copy.deepcopy(_tiny_master.vae)
    swap_vae(tiny, vae=other)
    assert tiny.vae is other
    other.save_pretrained(tmp_path / "vae")
    swap_vae(tiny, vae=str(tmp_path / "vae"))
    assert torch.equal(tiny.vae.decoder.conv_in.weight, other.decoder.conv_in.weight)
    with pytest.raises(Unavailable, match="no tuned VAE"):
        swap_vae(tiny)
    with pytest.raises(Unavailable, match="config.json"):
        swap_vae(tiny, vae=str(tmp_path / "absent"))


def test_distilled_student(tiny):
    from diffusers import UNet2DConditionModel

    config = dict(tiny.unet.config) | {"layers_per_block": 1, "mid_block_type": None}
    student = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    change = distilled_student(tiny, unet=student)
    assert tiny.unet is student and "student" in change.what
    with pytest.raises(Unavailable):
        distilled_student(tiny)  # twin:tiny ships no student


def test_registry_is_documented():
    for name, entry in OPTIMIZATIONS.items():
        assert entry.summary and entry.family and entry.tier in (0, 1, 2, 3), name
    guide = {
        "ddim",
        "dpm_solver",
        "swap_vae",
        "fp16",
        "model_cpu_offload",
        "vae_tiling",
        "attention_slicing",
        "xformers",
        "torch_compile",
        "int8_dynamic",
        "custom_scheduler",
        "distilled_student",
    }
    assert guide <= set(OPTIMIZATIONS)
