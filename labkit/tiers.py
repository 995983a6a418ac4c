"""The optimizations of the guide, one named function each, and the presets built from them.

Every function takes a pipeline, changes it with the current diffusers API, and returns a `Change`
that says what it changed. A function whose needs are missing here (a CUDA GPU, xFormers, torchao, a
trained variant) raises `Unavailable` with the reason; it never silently does nothing. `apply` runs a
preset or a list of optimizations in a fixed order (samplers, module swaps, precision, attention,
layout, quantization, offload, compile) and reports the unavailable ones instead of raising.

The pipeline remembers what was applied (``pipe.labkit_applied``) and the call settings that come with
it, such as the step count of a sampler (``pipe.labkit_call``); `labkit.generate` and
`labkit.benchmark` read both.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------
# The record, the registry and the checks
# ---------------------------------------------------------------------------------------------------


class Unavailable(RuntimeError):
    """An optimization that cannot run here; the message says why and what to do."""


@dataclass
class Change:
    """What one optimization did to a pipeline (``status`` is ``"applied"`` or ``"unavailable"``)."""

    name: str
    status: str
    what: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        name = f"{self.name}({options})" if options else self.name
        return f"{name}: {self.what}" if self.status == "applied" else f"{name}: UNAVAILABLE ({self.what})"


@dataclass(frozen=True)
class Optimization:
    """A registry entry: the function, its tier in the guide, its order in `apply`, what it needs."""

    name: str
    fn: Callable
    tier: int
    stage: int
    needs: tuple[str, ...]
    chapter: str

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


OPTIMIZATIONS: dict[str, Optimization] = {}

# apply() sorts by stage, so that e.g. compile always comes last and precision before quantization.
SAMPLER, SWAP, PRECISION, ATTENTION, LAYOUT, QUANTIZE, OFFLOAD, COMPILE = range(8)


def missing(need: str, pipe=None) -> str | None:
    """Why requirement ``need`` is not met here (None when it is)."""
    if need == "cuda":
        if not torch.cuda.is_available():
            return "needs a CUDA GPU; none is visible here"
        if pipe is not None and _device(pipe).type != "cuda":
            return "needs the pipeline on a CUDA GPU: load it with device='cuda'"
        return None
    if need == "xformers":
        return xformers_problem()
    if need == "torchao":
        if importlib.util.find_spec("torchao") is None:
            return "needs torchao: pip install 'labkit[quant]'"
        return None
    if need == "fp8":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            return "needs a GPU with fp8 tensor cores (Ada or Hopper, compute capability 8.9+)"
        return None
    raise ValueError(f"unknown requirement {need!r}")


@functools.cache
def xformers_problem() -> str | None:
    """Why xFormers cannot run here, or None. Imports it and runs one tiny attention on the GPU."""
    if importlib.util.find_spec("xformers") is None:
        return "xFormers is not installed: pip install 'labkit[xformers]' (its wheel must match your torch)"
    if not torch.cuda.is_available():
        return "xFormers kernels need a CUDA GPU"
    try:
        import xformers.ops

        q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as error:  # a wheel built for another torch fails here, in many ways
        return f"xFormers is installed but cannot run with this torch ({torch.__version__}): {error}"
    return None


def optimization(*, tier: int, stage: int, chapter: str, needs: tuple[str, ...] = ()):
    """Register ``fn`` as an optimization; the wrapper checks ``needs`` and records the `Change`."""

    def register(fn: Callable[..., str]) -> Callable[..., Change]:
        @functools.wraps(fn)
        def wrapper(pipe, **options) -> Change:
            for need in needs:
                if (problem := missing(need, pipe)) is not None:
                    raise Unavailable(f"{fn.__name__}: {problem}")
            what = fn(pipe, **options)
            change = Change(fn.__name__, "applied", what, options)
            pipe.labkit_applied = [*getattr(pipe, "labkit_applied", []), change]
            return change

        OPTIMIZATIONS[fn.__name__] = Optimization(fn.__name__, wrapper, tier, stage, needs, chapter)
        return wrapper

    return register


def _device(pipe) -> torch.device:
    return pipe._execution_device


def _set_call(pipe, **settings) -> str:
    """Record call settings (steps, guidance, ...) that come with an optimization; describe the change."""
    call = getattr(pipe, "labkit_call", {})
    changes = [f"{k} {call.get(k, 'default')} -> {v}" for k, v in settings.items()]
    pipe.labkit_call = call | settings
    return "; ".join(changes)


def _attention_modules(pipe) -> list[torch.nn.Module]:
    """The models whose attention processors the attention optimizations set (UNet and VAE)."""
    return [pipe.unet, pipe.vae]


# ---------------------------------------------------------------------------------------------------
# Tier 1: samplers, the VAE, precision
# ---------------------------------------------------------------------------------------------------


def _swap_scheduler(pipe, class_name: str, steps: int, **overrides) -> str:
    import diffusers

    before = type(pipe.scheduler).__name__
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    return f"scheduler {before} -> {class_name}; " + _set_call(pipe, steps=steps)


@optimization(tier=1, stage=SAMPLER, chapter="samplers")
def pndm(pipe, steps: int = 50) -> str:
    """PNDM (PLMS) at 50 steps: Stable Diffusion 1.x's default sampler, the baseline's."""
    return _swap_scheduler(pipe, "PNDMScheduler", steps, skip_prk_steps=True)


@optimization(tier=1, stage=SAMPLER, chapter="samplers")
def ddim(pipe, steps: int = 50) -> str:
    """DDIM at 50 steps, the guide's 'good balance'."""
    return _swap_scheduler(pipe, "DDIMScheduler", steps)


@optimization(tier=1, stage=SAMPLER, chapter="samplers")
def dpm_solver(pipe, steps: int = 20, karras: bool = False, sde: bool = False) -> str:
    """DPM-Solver++ (2M) at 20 steps, the guide's fast sampler; optionally Karras sigmas or the SDE variant."""
    algorithm = "sde-dpmsolver++" if sde else "dpmsolver++"
    return _swap_scheduler(
        pipe, "DPMSolverMultistepScheduler", steps, algorithm_type=algorithm, use_karras_sigmas=karras
    )


@optimization(tier=1, stage=SAMPLER, chapter="samplers")
def euler(pipe, steps: int = 30) -> str:
    """Euler (Karras et al.'s discrete Euler sampler), SDXL's default, at 30 steps."""
    return _swap_scheduler(pipe, "EulerDiscreteScheduler", steps)


@optimization(tier=1, stage=SAMPLER, chapter="samplers")
def ddpm(pipe, steps: int = 1000) -> str:
    """DDPM, ancestral sampling over all training steps: the slow reference sampler."""
    return _swap_scheduler(pipe, "DDPMScheduler", steps)


def _load_component(cls, source, pipe):
    """A VAE or UNet given as a module or a folder, in the pipeline's dtype and device."""
    from labkit.models import quiet_diffusers

    if isinstance(source, torch.nn.Module):
        module = source
    else:
        path = Path(source)
        if not (path / "config.json").exists():
            raise Unavailable(f"no {cls.__name__} folder at {path} (it needs a config.json)")
        module = cls.from_pretrained(path, use_safetensors=True)
    with quiet_diffusers():  # its note on casting with to() concerns modules kept in fp32; ours have none
        return module.to(device=pipe.unet.device, dtype=pipe.unet.dtype)


@optimization(tier=1, stage=SWAP, chapter="latent diffusion and the VAE")
def swap_vae(pipe, vae=None) -> str:
    """Replace the VAE (the guide's tuned VAE); by default the source's fine-tuned decoder, if it has one."""
    from diffusers import AutoencoderKL

    if vae is None:
        vae = _variant_dir(pipe, "vae")
    before = pipe.vae.config.get("_name_or_path") or "the pipeline's VAE"
    pipe.vae = _load_component(AutoencoderKL, vae, pipe)
    return f"vae {before} -> {pipe.vae.config.get('_name_or_path') or 'the given module'}"


def _variant_dir(pipe, kind: str) -> Path:
    """The folder of a trained variant (a tuned VAE, a student UNet) that ships with the source."""
    source = getattr(pipe, "labkit_source", None)
    if source == "shapes" or (kind == "vae" and str(source).startswith("shapes:")):  # variants share it
        from labkit import shapes

        folder = Path(shapes.__file__).parent / "variants" / kind
        if (folder / "config.json").exists():
            return folder
        raise Unavailable(f"the shapes model has no trained {kind} variant yet (expected in {folder})")
    if kind == "vae":
        raise Unavailable(
            f"{source} ships no tuned VAE: a fine-tuned VAE has the same architecture, so on a twin it "
            "would change the pictures, not the speed or memory; pass vae= a folder or module"
        )
    raise Unavailable(f"{source} ships no {kind} variant; pass a folder or module")


def _cast(pipe, dtype: torch.dtype) -> str:
    from labkit.models import quiet_diffusers

    before = pipe.unet.dtype
    with quiet_diffusers():  # its note on casting with to() concerns modules kept in fp32; ours have none
        pipe.to(dtype=dtype)
    return f"weights and activations {before} -> {dtype}"


@optimization(tier=1, stage=PRECISION, chapter="numerics")
def fp16(pipe) -> str:
    """Half precision (float16) weights and activations, the guide's FP16."""
    return _cast(pipe, torch.float16)


@optimization(tier=1, stage=PRECISION, chapter="numerics")
def bf16(pipe) -> str:
    """bfloat16 weights and activations: fp32's range at fp16's size, so no overflow to guard."""
    return _cast(pipe, torch.bfloat16)


@optimization(tier=1, stage=PRECISION, chapter="numerics", needs=("cuda",))
def tf32(pipe) -> str:
    """TensorFloat-32 matmuls and convolutions for fp32 models (a process-wide switch)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "fp32 matmuls and convolutions use TF32 tensor cores (for the whole process)"


# ---------------------------------------------------------------------------------------------------
# Tier 2: attention, layout, memory, compilation
# ---------------------------------------------------------------------------------------------------


@optimization(tier=0, stage=ATTENTION, chapter="attention")
def classic_attention(pipe) -> str:
    """Classic attention (softmax(QK^T)V materialised in memory): the baseline's, before PyTorch SDPA."""
    from diffusers.models.attention_processor import AttnProcessor

    for module in _attention_modules(pipe):
        module.set_attn_processor(AttnProcessor())
    return "attention processors -> AttnProcessor (classic, materialises the attention matrix)"


SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


class PinnedSDPAProcessor:
    """Diffusers' SDPA attention processor, with PyTorch SDPA restricted to one backend inside it."""

    def __init__(self, backend: str):
        from diffusers.models.attention_processor import AttnProcessor2_0
        from torch.nn.attention import SDPBackend

        self.backend = backend
        self.kernel = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[backend]
        self.processor = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.kernel):
            return self.processor(*args, **kwargs)


@optimization(tier=2, stage=ATTENTION, chapter="attention")
def sdpa(pipe, backend: str | None = None) -> str:
    """PyTorch scaled_dot_product_attention (diffusers' default); optionally the UNet's pinned to one backend.

    Only the UNet is pinned: the VAE's single attention head is 512 wide, beyond the flash kernel's
    limit of 256, and its one attention layer is not what the attention chapter measures.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend is not None and backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r}; choose one of {SDPA_BACKENDS}")
    if backend in ("efficient", "cudnn") and (problem := missing("cuda", pipe)):
        raise Unavailable(f"sdpa(backend={backend!r}): {problem}")
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if backend is None:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        return "attention processors -> AttnProcessor2_0 (PyTorch SDPA, backend chosen per call by PyTorch)"
    pipe.unet.set_attn_processor(PinnedSDPAProcessor(backend))
    return f"UNet attention -> PyTorch SDPA pinned to the {backend} backend; VAE attention -> SDPA"


@optimization(tier=2, stage=ATTENTION, chapter="attention", needs=("cuda", "xformers"))
def xformers(pipe) -> str:
    """xFormers memory-efficient attention (the guide's; compare with SDPA, which replaced it)."""
    pipe.enable_xformers_memory_efficient_attention()
    return "attention processors -> XFormersAttnProcessor"


@optimization(tier=2, stage=ATTENTION, chapter="memory")
def attention_slicing(pipe, slice_size: str | int = "auto") -> str:
    """Attention computed a slice of heads at a time: less peak memory without SDPA, slower with it."""
    pipe.enable_attention_slicing(slice_size)
    return f"attention processors -> SlicedAttnProcessor (slice_size={slice_size})"


@optimization(tier=2, stage=LAYOUT, chapter="compilation")
def fuse_qkv(pipe) -> str:
    """Fuse the query, key and value projections of self-attention into one matmul (UNet and VAE)."""
    pipe.fuse_qkv_projections()
    return "self-attention q/k/v projections fused into one linear layer"


@optimization(tier=2, stage=LAYOUT, chapter="compilation")
def channels_last(pipe) -> str:
    """Store UNet and VAE activations in channels-last (NHWC) order, which tensor-core convolutions prefer."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    return "UNet and VAE memory format -> channels_last"


@optimization(tier=2, stage=LAYOUT, chapter="memory")
def vae_tiling(pipe) -> str:
    """Decode (and encode) the image in overlapping tiles, so large images fit: `pipe.vae.enable_tiling()`."""
    pipe.vae.enable_tiling()
    return "VAE decodes in tiles (pipe.vae.use_tiling = True)"


@optimization(tier=2, stage=LAYOUT, chapter="memory")
def vae_slicing(pipe) -> str:
    """Decode a batch one image at a time: `pipe.vae.enable_slicing()`."""
    pipe.vae.enable_slicing()
    return "VAE decodes one image of the batch at a time (pipe.vae.use_slicing = True)"


@optimization(tier=2, stage=OFFLOAD, chapter="memory", needs=("cuda",))
def model_cpu_offload(pipe) -> str:
    """Keep each model in CPU memory and move it to the GPU only while it runs (accelerate hooks)."""
    pipe.enable_model_cpu_offload(device=_device(pipe))
    return "text encoder, UNet and VAE live on the CPU; each moves to the GPU while it runs"


@optimization(tier=2, stage=OFFLOAD, chapter="memory", needs=("cuda",))
def sequential_cpu_offload(pipe) -> str:
    """Move each layer's weights to the GPU only while that layer runs: least memory, slowest."""
    pipe.enable_sequential_cpu_offload(device=_device(pipe))
    return "every layer's weights live on the CPU and stream to the GPU layer by layer"


@optimization(tier=2, stage=OFFLOAD, chapter="memory", needs=("cuda",))
def group_offload(pipe, use_stream: bool = True, offload_type: str = "leaf_level") -> str:
    """Group offloading: groups of layers move to the GPU ahead of use, overlapped on a CUDA stream."""
    pipe.enable_group_offload(
        onload_device=_device(pipe),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        use_stream=use_stream,
    )
    return f"weights live on the CPU and are prefetched by {offload_type} groups (use_stream={use_stream})"


@optimization(tier=2, stage=COMPILE, chapter="compilation")
def torch_compile(
    pipe,
    mode: str = "default",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    vae: bool = False,
    regional: bool = False,
) -> str:
    """`torch.compile` the UNet (and the VAE decoder if ``vae``); ``regional`` compiles only its repeated blocks."""
    if regional:
        pipe.unet.compile_repeated_blocks(mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        what = f"UNet's repeated transformer blocks compiled (mode={mode})"
    else:
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        what = f"UNet compiled (mode={mode}, fullgraph={fullgraph}, dynamic={dynamic})"
    if vae:
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        what += "; VAE decode compiled"
    if mode == "reduce-overhead" and _device(pipe).type != "cuda":
        what += " (CUDA graphs need a GPU: on this device reduce-overhead compiles like default)"
    return what + "; the first call pays the compile time"


# ---------------------------------------------------------------------------------------------------
# Tier 3: quantization, custom schedulers, distilled students
# ---------------------------------------------------------------------------------------------------


def _quantize(pipe, config, label: str) -> str:
    from torchao.quantization import quantize_

    size_before = _weight_bytes(pipe.unet)
    quantize_(pipe.unet, config)
    size_after = _weight_bytes(pipe.unet)
    return f"UNet linear layers -> {label}; UNet weights {size_before / 2**20:.0f} MiB -> {size_after / 2**20:.0f} MiB"


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters, counting quantized tensor subclasses by their storage."""
    total = 0
    for p in module.parameters():
        inner = [getattr(p, name) for name in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total


@optimization(tier=3, stage=QUANTIZE, chapter="int8", needs=("torchao",))
def int8_weight_only(pipe) -> str:
    """INT8 weight-only post-training quantization of the UNet's linear layers (torchao)."""
    from torchao.quantization import Int8WeightOnlyConfig

    return _quantize(pipe, Int8WeightOnlyConfig(), "int8 weights, activations in the model dtype")


@optimization(tier=3, stage=QUANTIZE, chapter="int8", needs=("torchao",))
def int8_dynamic(pipe) -> str:
    """INT8 dynamic quantization of the UNet's linear layers: int8 weights and int8 activations (torchao)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return _quantize(
        pipe, Int8DynamicActivationInt8WeightConfig(), "int8 weights and dynamic int8 activations"
    )


@optimization(tier=3, stage=QUANTIZE, chapter="int8", needs=("torchao", "cuda", "fp8"))
def fp8_dynamic(pipe) -> str:
    """FP8 (e4m3) dynamic quantization of the UNet's linear layers, on GPUs with fp8 tensor cores (torchao)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    return _quantize(
        pipe, Float8DynamicActivationFloat8WeightConfig(), "fp8 weights and dynamic fp8 activations"
    )


@optimization(tier=3, stage=QUANTIZE, chapter="int8", needs=("torchao",))
def int8_qat(pipe, scheme: str = "int8_dynamic") -> str:
    """INT8 after quantization-aware training: the source's QAT-tuned linear weights, then int8 (torchao)."""
    from labkit.quantization import load_qat_weights, ptq_config

    loaded = load_qat_weights(pipe, scheme=scheme)
    return f"{loaded}; " + _quantize(pipe, ptq_config(scheme), f"{scheme} (after QAT)")


@optimization(tier=3, stage=SAMPLER, chapter="custom schedulers")
def custom_scheduler(
    pipe,
    beta_schedule: str = "squaredcos_cap_v2",
    prediction_type: str = "v_prediction",
    rescale_betas_zero_snr: bool = True,
    timestep_spacing: str = "trailing",
    steps: int = 50,
) -> str:
    """DDIM with another noise schedule and prediction type; only right for a model *trained* that way.

    The guide's ``beta_schedule="cosine"`` is not a diffusers name (it raises); the cosine schedule is
    ``"squaredcos_cap_v2"``.
    """
    trained = getattr(pipe, "labkit_trained", None) or {}
    what = _swap_scheduler(
        pipe,
        "DDIMScheduler",
        steps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        timestep_spacing=timestep_spacing,
    )
    asked = (
        ("beta_schedule", beta_schedule),
        ("prediction_type", prediction_type),
        ("rescale_betas_zero_snr", rescale_betas_zero_snr),
    )
    mismatched = [
        f"{key}={trained[key]!r}" for key, value in asked if key in trained and trained[key] != value
    ]
    if mismatched:
        warning = f"the model was trained with {', '.join(mismatched)}: expect ruined images"
        warnings.warn(f"custom_scheduler: {warning}", stacklevel=3)
        what += f"; WARNING: {warning}"
    return what


@optimization(tier=3, stage=SWAP, chapter="distilled models")
def distilled_student(pipe, unet=None) -> str:
    """Replace the UNet by a smaller student distilled from it (BK-SDM style); by default the source's own."""
    from diffusers import UNet2DConditionModel

    source = getattr(pipe, "labkit_source", "")
    before = sum(p.numel() for p in pipe.unet.parameters())
    if unet is None and source in ("twin:sd15", "twin:bk-sdm-base"):
        from labkit.models import twin_config

        with torch.device(pipe.unet.device):  # random weights, like the twin
            unet = UNet2DConditionModel(**twin_config("bk-sdm-small")["unet"])
    elif unet is None:
        unet = _variant_dir(pipe, "student")
    pipe.unet = _load_component(UNet2DConditionModel, unet, pipe)
    after = sum(p.numel() for p in pipe.unet.parameters())
    return f"UNet {before / 1e6:.3g}M -> student {after / 1e6:.3g}M parameters"


# ---------------------------------------------------------------------------------------------------
# Presets and apply()
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named list of optimizations plus the call settings (steps, guidance, batch, size) it implies."""

    name: str
    description: str
    steps: list[tuple[str, dict]]
    call: dict = field(default_factory=dict)


def _p(name: str, **options) -> tuple[str, dict]:
    return (name, options)


_TIER1 = [_p("dpm_solver", steps=20), _p("fp16"), _p("sdpa"), _p("swap_vae")]
_TIER2 = [
    _p("model_cpu_offload"),
    _p("vae_tiling"),
    _p("attention_slicing"),
    _p("xformers"),
    _p("torch_compile", mode="reduce-overhead"),
]
_TIER3 = [_p("int8_dynamic"), _p("distilled_student")]

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "baseline",
            "The reference: fp32, classic attention, PNDM at 50 steps, guidance 7.5 (Stable Diffusion 1.x as "
            "released, before PyTorch SDPA).",
            [_p("pndm", steps=50), _p("classic_attention")],
            {"guidance": 7.5},
        ),
        Preset(
            "tier1",
            "The guide's tier 1: DPM-Solver++ at 20 steps, fp16, the tuned VAE where the source has one; "
            "attention is PyTorch SDPA (diffusers' default).",
            _TIER1,
            {"guidance": 7.5},
        ),
        Preset(
            "tier1+2",
            "Tier 1 plus the guide's tier 2 as written: model CPU offload, VAE tiling, attention slicing, "
            "xFormers, torch.compile (reduce-overhead).",
            _TIER1 + _TIER2,
            {"guidance": 7.5},
        ),
        Preset(
            "tier1+2+3",
            "Tiers 1 and 2 plus tier 3: int8 dynamic quantization of the UNet and a distilled student UNet. "
            "Custom schedulers are left out: they need a model trained for them (custom schedulers chapter).",
            _TIER1 + _TIER2 + _TIER3,
            {"guidance": 7.5},
        ),
        Preset(
            "latency",
            "Real-time generation: DPM-Solver++ at 20 steps, fp16, xFormers (else SDPA), torch.compile with "
            "CUDA graphs (reduce-overhead). The guide expects < 1 s per 512 px image.",
            [
                _p("dpm_solver", steps=20),
                _p("fp16"),
                _p("sdpa"),
                _p("xformers"),
                _p("torch_compile", mode="reduce-overhead"),
            ],
            {"guidance": 7.5, "batch": 1},
        ),
        Preset(
            "quality",
            "High quality: DDIM at 100 steps, fp16, guidance 12, the tuned VAE. The guide's cosine beta "
            "schedule is left out: it needs a model trained for it. The guide expects about 5 s per image.",
            [_p("ddim", steps=100), _p("fp16"), _p("sdpa"), _p("swap_vae")],
            {"guidance": 12.0},
        ),
        Preset(
            "memory",
            "Memory constrained (4-6 GB): fp16, model CPU offload, VAE tiling, attention slicing, the model's "
            "own sampler at 50 steps.",
            [_p("fp16"), _p("model_cpu_offload"), _p("vae_tiling"), _p("attention_slicing")],
            {"guidance": 7.5, "steps": 50},
        ),
        Preset(
            "throughput",
            "Batch processing: batch 16, fp16, xFormers (else SDPA), torch.compile, the model's own sampler "
            "at 50 steps. The guide expects maximum images per second.",
            [_p("fp16"), _p("sdpa"), _p("xformers"), _p("torch_compile", mode="default")],
            {"guidance": 7.5, "steps": 50, "batch": 16},
        ),
        Preset(
            "complete",
            "The guide's complete optimization stack, line by line: fp16, DPM-Solver++ at 20 steps, the tuned "
            "VAE, model CPU offload, VAE tiling, xFormers, torch.compile (reduce-overhead), 1024x1024.",
            [
                _p("dpm_solver", steps=20),
                _p("fp16"),
                _p("swap_vae"),
                _p("model_cpu_offload"),
                _p("vae_tiling"),
                _p("xformers"),
                _p("torch_compile", mode="reduce-overhead"),
            ],
            {"guidance": 7.5, "size": 1024},
        ),
    ]
}


def parse_step(text: str) -> tuple[str, dict]:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` (the CLI's --apply syntax) into (name, options)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = _parse_value(value)
    return name, options


def _parse_value(value: str) -> Any:
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def apply(pipe, spec: str | list) -> list[Change]:
    """Apply a preset (by name) or a list of optimizations (names or ``(name, options)``) to ``pipe``.

    Steps run in the registry's stage order (samplers, swaps, precision, attention, layout,
    quantization, offload, compile). A step that cannot run here is skipped and reported as an
    ``"unavailable"`` `Change` with the reason (and a warning); nothing is skipped silently.
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown preset {spec!r}; choose one of {list(PRESETS)}")
        preset = PRESETS[spec]
        steps, call = preset.steps, preset.call
        pipe.labkit_preset = spec
    else:
        steps, call = [parse_step(s) if isinstance(s, str) else s for s in spec], {}
    unknown = [name for name, _ in steps if name not in OPTIMIZATIONS]
    if unknown:
        raise ValueError(f"unknown optimization(s) {unknown}; see labkit.tiers.OPTIMIZATIONS")
    changes = []
    for name, options in sorted(steps, key=lambda step: OPTIMIZATIONS[step[0]].stage):
        try:
            changes.append(OPTIMIZATIONS[name].fn(pipe, **options))
        except Unavailable as reason:
            warnings.warn(str(reason), stacklevel=2)
            change = Change(name, "unavailable", str(reason).removeprefix(f"{name}: "), options)
            pipe.labkit_applied = [*getattr(pipe, "labkit_applied", []), change]
            changes.append(change)
    if call:
        _set_call(pipe, **call)
    return changes


def preset_problems(name: str, pipe=None) -> list[str]:
    """The steps of preset ``name`` whose needs are not met here, each with the reason (for `doctor`)."""
    problems = []
    for step, _ in PRESETS[name].steps:
        for need in OPTIMIZATIONS[step].needs:
            if (problem := missing(need, pipe)) is not None:
                problems.append(f"{step}: {problem}")
                break
    return problems
