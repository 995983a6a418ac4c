"""Every optimization really changes the pipeline, every preset applies, and missing needs are reported."""

import importlib.util
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

import labkit
from labkit import tiers
from labkit.tiers import OPTIMIZATIONS, PRESETS, Unavailable

has_torchao = importlib.util.find_spec("torchao") is not None


def processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


@pytest.fixture
def no_cuda_check(monkeypatch):
    """Let the CUDA-only optimizations run on the CPU, to check what they change (offload hooks)."""
    real = tiers.missing
    monkeypatch.setattr(
        tiers, "missing", lambda need, pipe=None: None if need == "cuda" else real(need, pipe)
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
    tiers.dpm_solver(tiny, karras=True, sde=True, steps=15)
    assert tiny.scheduler.config.algorithm_type == "sde-dpmsolver++"
    assert tiny.scheduler.config.use_karras_sigmas and tiny.labkit_call["steps"] == 15


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision(tiny, name, dtype):
    OPTIMIZATIONS[name].fn(tiny)
    assert tiny.unet.dtype == tiny.vae.dtype == tiny.text_encoder.dtype == dtype


def test_attention_processors(tiny):
    tiers.classic_attention(tiny)
    assert processors(tiny) == {AttnProcessor}
    assert {type(p) for p in tiny.vae.attn_processors.values()} == {AttnProcessor}
    tiers.sdpa(tiny)
    assert processors(tiny) == {AttnProcessor2_0}
    tiers.attention_slicing(tiny)
    assert processors(tiny) == {SlicedAttnProcessor}


def test_sdpa_backend_is_pinned_in_the_unet_only(tiny, monkeypatch):

    tiers.sdpa(tiny, backend="math")
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
        tiers.sdpa(tiny, backend="fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_only_optimizations_raise_on_a_cpu(tiny):
    for name in ("tf32", "xformers", "model_cpu_offload", "sequential_cpu_offload", "group_offload"):
        with pytest.raises(Unavailable, match="CUDA"):
            OPTIMIZATIONS[name].fn(tiny)
    with pytest.raises(Unavailable, match="CUDA"):
        tiers.sdpa(tiny, backend="efficient")
    assert tiny.labkit_applied == []  # nothing half-applied is recorded


def test_xformers_problem_is_explained():
    problem = tiers.xformers_problem()
    if importlib.util.find_spec("xformers") is None:
        assert "not installed" in problem and "labkit[xformers]" in problem
    elif not torch.cuda.is_available():
        assert "CUDA" in problem


def test_fuse_qkv(tiny):
    tiers.fuse_qkv(tiny)
    assert {type(p).__name__ for p in tiny.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    attention = next(m for m in tiny.unet.modules() if hasattr(m, "fused_projections"))
    assert attention.fused_projections


def test_channels_last(tiny):
    tiers.channels_last(tiny)
    assert tiny.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tiny.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_tiling_and_slicing(tiny):
    tiers.vae_tiling(tiny)
    tiers.vae_slicing(tiny)
    assert tiny.vae.use_tiling and tiny.vae.use_slicing


def test_model_cpu_offload_adds_hooks(tiny, no_cuda_check):
    tiers.model_cpu_offload(tiny)
    assert hasattr(tiny.unet, "_hf_hook") and hasattr(tiny.vae, "_hf_hook")


def test_sequential_cpu_offload_adds_hooks(tiny, no_cuda_check):
    tiers.sequential_cpu_offload(tiny)
    assert hasattr(tiny.unet.conv_in, "_hf_hook")


def test_group_offload(tiny, no_cuda_check):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    tiers.group_offload(tiny, use_stream=False)
    assert _is_group_offload_enabled(tiny.unet)


def test_torch_compile_wraps_the_unet(tiny):
    tiers.torch_compile(tiny, mode="default", vae=True)
    assert type(tiny.unet).__name__ == "OptimizedModule"
    assert (
        hasattr(tiny.vae.decode, "_torchdynamo_orig_callable")
        or "torch._dynamo" in type(tiny.vae.decode).__module__
    )


@pytest.mark.skipif(not has_torchao, reason="torchao not installed (pip install 'labkit[quant]')")
@pytest.mark.parametrize("name", ["int8_weight_only", "int8_dynamic"])
def test_int8_quantizes_the_unet_linear_layers(tiny, name):
    before = tiers._weight_bytes(tiny.unet)
    OPTIMIZATIONS[name].fn(tiny)
    linear = next(m for m in tiny.unet.modules() if isinstance(m, torch.nn.Linear))
    assert type(linear.weight).__module__.startswith("torchao")
    assert tiers._weight_bytes(tiny.unet) < before
    assert labkit.generate(tiny, steps=1).shape == (1, 64, 64, 3)


def test_fp8_needs_a_recent_gpu(tiny):
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable):
            tiers.fp8_dynamic(tiny)


def test_custom_scheduler_and_the_guides_cosine(tiny):
    from diffusers import DDIMScheduler

    with pytest.raises(NotImplementedError):  # the guide's snippet, as written
        DDIMScheduler(beta_schedule="cosine", prediction_type="v_prediction")
    with pytest.warns(UserWarning, match="trained with"):
        change = tiers.custom_scheduler(tiny)  # tiny was built for epsilon and scaled_linear
    config = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"
    assert config.beta_schedule == "squaredcos_cap_v2" and config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert "WARNING" in change.what


def test_swap_vae(tiny, _tiny_master, tmp_path):
    import copy

    other = copy.deepcopy(_tiny_master.vae)
    tiers.swap_vae(tiny, vae=other)
    assert tiny.vae is other
    other.save_pretrained(tmp_path / "vae")
    tiers.swap_vae(tiny, vae=str(tmp_path / "vae"))
    assert torch.equal(tiny.vae.decoder.conv_in.weight, other.decoder.conv_in.weight)
    with pytest.raises(Unavailable, match="no tuned VAE"):
        tiers.swap_vae(tiny)
    with pytest.raises(Unavailable, match="config.json"):
        tiers.swap_vae(tiny, vae=str(tmp_path / "absent"))


def test_distilled_student(tiny):
    from diffusers import UNet2DConditionModel

    config = dict(tiny.unet.config) | {"layers_per_block": 1, "mid_block_type": None}
    student = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    change = tiers.distilled_student(tiny, unet=student)
    assert tiny.unet is student and "student" in change.what
    with pytest.raises(Unavailable):
        tiers.distilled_student(tiny)  # twin:tiny ships no student


def test_registry_is_documented():
    for name, entry in OPTIMIZATIONS.items():
        assert entry.summary and entry.chapter and entry.tier in (0, 1, 2, 3), name
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


def test_presets_name_known_optimizations():
    assert {
        "baseline",
        "tier1",
        "tier1+2",
        "tier1+2+3",
        "latency",
        "quality",
        "memory",
        "throughput",
        "complete",
    } <= set(PRESETS)
    for preset in PRESETS.values():
        assert preset.description
        assert all(step in OPTIMIZATIONS for step, _ in preset.steps)


def test_baseline_preset(tiny):
    changes = labkit.apply(tiny, "baseline")
    assert all(c.status == "applied" for c in changes)
    assert type(tiny.scheduler).__name__ == "PNDMScheduler" and processors(tiny) == {AttnProcessor}
    assert tiny.unet.dtype == torch.float32
    assert tiny.labkit_call == {"steps": 50, "guidance": 7.5}


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "baseline"])
def test_every_preset_applies_or_says_why_not(tiny, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        changes = labkit.apply(tiny, name)
    preset = PRESETS[name]
    assert [c.name for c in changes] == sorted(
        (s for s, _ in preset.steps), key=lambda s: OPTIMIZATIONS[s].stage
    )
    for change in changes:
        assert change.status in ("applied", "unavailable") and change.what
    applied = {c.name for c in changes if c.status == "applied"}
    if "fp16" in applied:
        assert tiny.unet.dtype == torch.float16
    if "dpm_solver" in applied:
        assert type(tiny.scheduler).__name__ == "DPMSolverMultistepScheduler"
    if "torch_compile" in applied:
        assert type(tiny.unet).__name__ == "OptimizedModule"
    for key, value in preset.call.items():
        assert tiny.labkit_call[key] == value
    if not torch.cuda.is_available() and "model_cpu_offload" in {s for s, _ in preset.steps}:
        assert "model_cpu_offload" not in applied


def test_apply_orders_compile_last_and_parses_options(tiny):
    changes = labkit.apply(tiny, ["torch_compile:mode=default", "fp16", ("dpm_solver", {"steps": 8})])
    assert [c.name for c in changes] == ["dpm_solver", "fp16", "torch_compile"]
    assert tiny.labkit_call["steps"] == 8
    with pytest.raises(ValueError, match="unknown optimization"):
        labkit.apply(tiny, ["fp64"])
    with pytest.raises(ValueError, match="unknown preset"):
        labkit.apply(tiny, "fastest")


def test_parse_step():
    assert tiers.parse_step("torch_compile:mode=reduce-overhead,fullgraph=true") == (
        "torch_compile",
        {"mode": "reduce-overhead", "fullgraph": True},
    )
    assert tiers.parse_step("dpm_solver:steps=20") == ("dpm_solver", {"steps": 20})
