"""Quantization (tier 3) with torchao: the schemes, what they cover, QAT's two steps, the shipped QAT weights.

- `SCHEMES`: the settings the lab compares, each an optimization of its own: ``int8_weight_only``,
  ``int8_dynamic`` (int8 weights and activations), ``int8_int4`` (int4 weights, int8 activations),
  ``fp8_dynamic`` (GPUs with fp8 tensor cores), and ``int8_qat`` (int8 dynamic on QAT-tuned weights);
- `coverage`: which share of a UNet's weights torchao quantizes at all (``quantize_`` swaps
  ``nn.Linear`` layers only; convolutions stay in float), and so the most memory it can save;
- `prepare_qat` and `convert_qat`: torchao's two QAT steps (``QATConfig(step="prepare")``, then
  ``step="convert"``), used by the QAT trainer (`labkit.training.qat`);
- `load_qat_weights`: the QAT-tuned linear weights shipped with ``shapes`` (``variants/qat``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from labkit.optimizations.registry import QUANTIZE, Unavailable, missing, optimization
from labkit.records import shown

# ---------------------------------------------------------------------------------------------------
# The schemes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """One quantization setting: its description and the bits of its weights and activations."""

    name: str
    description: str
    weight_bits: int
    activation_bits: int | None
    """``None``: activations stay in the model's float dtype."""


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("int8_weight_only", "int8 weights (per channel), float activations", 8, None),
        Scheme(
            "int8_dynamic",
            "int8 weights (per channel) and int8 activations (per token, scaled at run time)",
            8,
            8,
        ),
        Scheme(
            "int8_int4",
            "int4 weights (groups of 32) and int8 activations (per token): the harsher setting",
            4,
            8,
        ),
        Scheme(
            "fp8_dynamic",
            "fp8 (e4m3) weights and activations, per tensor (GPUs with fp8 tensor cores)",
            8,
            8,
        ),
    ]
}
"""The quantization settings, by name; each is also the name of its optimization."""

QAT_SCHEMES = ("int8_dynamic", "int8_weight_only", "int8_int4")
"""The schemes `prepare_qat` knows how to imitate."""


def ptq_config(name: str):
    """The torchao post-training quantization config of scheme ``name``."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    import torchao.quantization as tq

    if name == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    if name == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if name == "int8_int4":
        from torchao.quantization.granularity import PerGroup

        return tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32)
        )
    return tq.Float8DynamicActivationFloat8WeightConfig()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters, quantized tensor subclasses counted by their storage."""
    total = 0
    for p in module.parameters():
        inner = [getattr(p, name) for name in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total


def _quantize(pipe, scheme: str) -> str:
    from torchao.quantization import quantize_

    before = weight_bytes(pipe.unet)
    try:
        quantize_(pipe.unet, ptq_config(scheme))
    except (RuntimeError, NotImplementedError, AssertionError, TypeError, ValueError) as error:
        # torchao raises plain errors for a dtype or device it has no kernel for
        first = (str(error).splitlines() or [""])[0]
        raise Unavailable(
            f"{scheme}: torchao could not quantize here ({type(error).__name__}: {first})"
        ) from None
    after = weight_bytes(pipe.unet)
    return (
        f"UNet linear layers -> {SCHEMES[scheme].description}; "
        f"UNet weights {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB"
    )


@optimization(tier=3, stage=QUANTIZE, needs=("torchao",))
def int8_weight_only(pipe) -> str:
    """INT8 weight-only post-training quantization of the UNet's linear layers (torchao)."""
    return _quantize(pipe, "int8_weight_only")


@optimization(tier=3, stage=QUANTIZE, needs=("torchao",))
def int8_dynamic(pipe) -> str:
    """INT8 dynamic quantization of the UNet's linear layers: int8 weights and int8 activations (torchao)."""
    return _quantize(pipe, "int8_dynamic")


@optimization(tier=3, stage=QUANTIZE, needs=("torchao",))
def int8_int4(pipe) -> str:
    """int4 weights (groups of 32) with int8 activations on the UNet's linear layers (torchao): the harsher setting."""
    return _quantize(pipe, "int8_int4")


@optimization(tier=3, stage=QUANTIZE, needs=("torchao", "cuda", "fp8"))
def fp8_dynamic(pipe) -> str:
    """FP8 (e4m3) dynamic quantization of the UNet's linear layers, on GPUs with fp8 tensor cores (torchao)."""
    return _quantize(pipe, "fp8_dynamic")


@optimization(tier=3, stage=QUANTIZE, needs=("torchao",))
def int8_qat(pipe, scheme: str = "int8_dynamic") -> str:
    """INT8 after quantization-aware training: the source's QAT-tuned linear weights, then int8 (torchao)."""
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"int8_qat scheme must be one of {', '.join(QAT_SCHEMES)}, not {scheme!r}")
    loaded = load_qat_weights(pipe, scheme=scheme)
    return f"{loaded}; " + _quantize(pipe, scheme) + " (after QAT)"


# ---------------------------------------------------------------------------------------------------
# What torchao quantizes
# ---------------------------------------------------------------------------------------------------


def linear_names(module: torch.nn.Module) -> list[str]:
    """Names of the layers torchao's ``quantize_`` swaps by default: ``nn.Linear`` (and subclasses)."""
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def coverage(module: torch.nn.Module) -> dict:
    """Which share of ``module``'s weights sit in layers torchao quantizes (``nn.Linear``), by kind.

    Returns ``parameters``, ``linear_parameters``, ``conv_parameters``, ``other_parameters`` (norms,
    embeddings' biases...), ``linear_share`` and ``max_saving_int8``: the largest cut of the weight
    bytes int8 can give from fp32 (linear weights 4 -> 1 byte, the rest unchanged), which bounds the
    guide's "75% memory".
    """
    linear = conv = other = 0
    for m in module.modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, torch.nn.Linear):
            linear += own
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            conv += own
        else:
            other += own
    total = linear + conv + other
    share = linear / total if total else 0.0
    return {
        "parameters": total,
        "linear_parameters": linear,
        "conv_parameters": conv,
        "other_parameters": other,
        "linear_share": share,
        "max_saving_int8": 0.75 * share,
    }


# ---------------------------------------------------------------------------------------------------
# Quantization-aware training: torchao's two steps
# ---------------------------------------------------------------------------------------------------


class PerTokenSymmetric(torch.nn.Module):
    """Symmetric int8 fake quantization per token (per row of the last dimension), as the PTQ config
    quantizes activations.

    torchao 0.18's own per-token fake quantizer is asymmetric only ("Symmetric per token is not
    supported yet"), and its symmetric per-channel path takes 2-D tensors; this wraps the latter
    around the tokens of a tensor of any rank.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        dtype = {8: torch.int8, 4: torch.int4}[bits]
        self.inner = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, "per_channel", is_symmetric=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def fake_quantize_configs(name: str) -> tuple:
    """(activation, weight) fake quantizers' configs that imitate scheme ``name`` in QAT.

    They mirror the PTQ configs' defaults: int8 weights symmetric per output channel; for
    ``int8_int4`` torchao infers them from the PTQ config (int4 weights in groups of 32, int8
    activations asymmetric per token). The activation entry is ``"per_token_symmetric"`` where
    `PerTokenSymmetric` stands in for torchao's missing quantizer.
    """
    if name not in QAT_SCHEMES:
        raise ValueError(f"QAT imitates {', '.join(QAT_SCHEMES)}, not {name!r}")
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    if name == "int8_int4":
        return _infer_fake_quantize_configs(ptq_config(name))
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return ("per_token_symmetric" if name == "int8_dynamic" else None), weight


def prepare_qat(unet: torch.nn.Module, scheme: str = "int8_dynamic") -> torch.nn.Module:
    """QAT step 1 (torchao ``QATConfig(step="prepare")``): every ``nn.Linear`` -> ``FakeQuantizedLinear``.

    The forward pass then rounds weights (and activations) as ``scheme`` will, in float arithmetic,
    and gradients flow through the rounding (straight-through estimator). In place; returns ``unet``.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    activation, weight = fake_quantize_configs(scheme)
    if scheme == "int8_int4":  # torchao derives the fakes from the PTQ config itself
        quantize_(unet, QATConfig(ptq_config(scheme), step="prepare"))
        return unet
    quantize_(unet, QATConfig(weight_config=weight, step="prepare"))
    if activation == "per_token_symmetric":
        for module in unet.modules():
            if isinstance(module, FakeQuantizedLinear):
                module.activation_fake_quantizer = PerTokenSymmetric()
    return unet


def convert_qat(unet: torch.nn.Module, scheme: str | None = "int8_dynamic") -> torch.nn.Module:
    """QAT step 2 (``QATConfig(step="convert")``): back to ``nn.Linear``, then quantize for real.

    With ``scheme=None`` only the module swap is done (float weights, e.g. to save them). In place.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(unet, QATConfig(step="convert"))
    if scheme is not None:
        quantize_(unet, ptq_config(scheme))
    return unet


# ---------------------------------------------------------------------------------------------------
# The shipped QAT weights
# ---------------------------------------------------------------------------------------------------

VARIANT_CONFIG = "config.json"
"""The QAT variant's description (schemes, base fingerprint, training) in its folder."""


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of a UNet's float weights: the QAT variant records its base's, and loads only on it."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def linear_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights and biases of the UNet's ``nn.Linear`` layers (the tensors QAT changes), by state-dict name."""
    return {
        f"{name}.{key}": tensor
        for name in linear_names(unet)
        for key, tensor in unet.get_submodule(name).state_dict().items()
        if key in ("weight", "bias")
    }


def qat_command(scheme: str, folder) -> str:
    """The command that trains and ships the QAT weights of ``scheme`` into ``folder``."""
    return f"labkit train qat --scheme {scheme} --export {shown(folder)}"


def variant_problem(folder: str | Path, unet: torch.nn.Module, scheme: str) -> str | None:
    """Why the QAT weights in ``folder`` cannot be loaded on ``unet`` for ``scheme`` (None when they can)."""
    path = Path(folder) / VARIANT_CONFIG
    command = qat_command(scheme, folder)
    if not path.exists():
        return f"no QAT weights in {shown(folder)}; train them with `{command}`"
    entry = json.loads(path.read_text())["schemes"].get(scheme)
    if entry is None:
        return f"no QAT weights for {scheme} in {shown(folder)}; train them with `{command}`"
    if entry["base_fingerprint"] != unet_fingerprint(unet):
        return (
            f"the QAT weights in {shown(folder)} were fine-tuned from another UNet (fingerprint "
            f"{entry['base_fingerprint']}); the shipped model changed since: retrain with `{command}`"
        )
    return None


def load_variant(unet: torch.nn.Module, folder: str | Path, scheme: str) -> int:
    """Load the QAT linear weights of ``scheme`` from ``folder`` into ``unet`` (in place); returns their count."""
    from safetensors.torch import load_file

    entry = json.loads((Path(folder) / VARIANT_CONFIG).read_text())["schemes"][scheme]
    tensors = load_file(str(Path(folder) / entry["weights"]))
    param = next(unet.parameters())
    tensors = {k: v.to(device=param.device, dtype=param.dtype) for k, v in tensors.items()}
    _, unexpected = unet.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"QAT weights with names this UNet lacks: {unexpected[:3]}...")
    return len(tensors)


def qat_folder() -> Path:
    """Where the shapes model's QAT weights ship."""
    from labkit.shapes import VARIANTS_DIR

    return Path(VARIANTS_DIR) / "qat"


def load_qat_weights(pipe, scheme: str = "int8_dynamic", folder: str | Path | None = None) -> str:
    """Load the QAT-tuned linear weights of ``scheme`` into ``pipe.unet`` (before quantizing it).

    By default from the shapes model's ``variants/qat``. Raises `Unavailable` on a source with no QAT
    weights (a twin: its weights are random), when the weights were tuned from another base UNet, or
    when the UNet is already quantized.
    """
    if (problem := missing("torchao")) is not None:
        raise Unavailable(f"int8_qat: {problem}")
    source = getattr(pipe, "labkit_source", None)
    if folder is None:
        if source != "shapes":
            raise Unavailable(
                f"{source} ships no QAT weights (QAT fine-tunes trained weights; a twin's are random): "
                "for speed and memory use int8_dynamic, the same int8 kernels"
            )
        folder = qat_folder()
    if any(type(p) is not torch.nn.Parameter for p in pipe.unet.parameters()):
        raise Unavailable("the UNet is already quantized: load the QAT weights before quantizing")
    if (problem := variant_problem(folder, pipe.unet, scheme)) is not None:
        raise Unavailable(problem)
    count = load_variant(pipe.unet, folder, scheme)
    return f"{count} QAT-tuned linear tensors loaded from {shown(folder)}"
