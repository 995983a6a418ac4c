"""Quantization with torchao: the schemes, what they cover, QAT's prepare and convert, the chapter's
experiments and its verdict. Used in the INT8 chapter (``notebooks/07_quantization.ipynb``).

- :data:`SCHEMES`: the quantization settings the chapter compares (int8 weight-only, int8 dynamic,
  int8 activations with int4 weights, fp8 dynamic), each with its torchao post-training config and
  the fake quantization that imitates it during quantization-aware training (QAT);
- :func:`coverage`: which share of a UNet's weights torchao quantizes at all (``quantize_`` swaps
  ``nn.Linear`` layers only; convolutions stay in float), and so the most memory it can save;
- :func:`prepare_qat` and :func:`convert_qat`: torchao's two QAT steps
  (``QATConfig(..., step="prepare")`` then ``step="convert"``);
- :func:`quantization_speed` (seconds per image, UNet weight bytes and peak memory on a twin),
  :func:`quantization_quality` (prompt accuracy, FID and same-seed PSNR on ``shapes``),
  :func:`quantization_images`, and :func:`quantization_verdict`, the verdict rows computed from the
  records with `labkit.lab.judge`.

The fine-tuning itself is :mod:`labkit.shapes.qat`; the QAT weights it ships are applied by
`labkit.tiers.int8_qat`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from labkit import quality, tiers
from labkit.measure import benchmark, image_check, release_memory

# ---------------------------------------------------------------------------------------------------
# The schemes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """One quantization setting: its labkit optimization (if any), torchao PTQ config and QAT fakes."""

    name: str
    description: str
    optimization: str | None
    """The `labkit.tiers` optimization that applies it, if there is one."""
    weight_bits: int
    activation_bits: int | None
    """``None``: activations stay in the model's float dtype."""


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme(
            "int8_weight_only",
            "int8 weights (per channel), float activations",
            "int8_weight_only",
            8,
            None,
        ),
        Scheme(
            "int8_dynamic",
            "int8 weights (per channel) and int8 activations (per token, scaled at run time)",
            "int8_dynamic",
            8,
            8,
        ),
        Scheme(
            "int8_int4",
            "int4 weights (groups of 32) and int8 activations (per token): the harsher setting",
            None,
            4,
            8,
        ),
        Scheme(
            "fp8_dynamic",
            "fp8 (e4m3) weights and activations, per tensor (GPUs with fp8 tensor cores)",
            "fp8_dynamic",
            8,
            8,
        ),
    ]
}
"""The settings of the INT8 chapter, by name."""

QAT_SCHEMES = ("int8_dynamic", "int8_weight_only", "int8_int4")
"""The schemes :func:`prepare_qat` knows how to imitate."""


def _scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {list(SCHEMES)}")
    return SCHEMES[name]


def torchao_problem() -> str | None:
    """Why torchao cannot be used here (None when it can)."""
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao: pip install 'labkit[quant]'"
    return None


def ptq_config(name: str):
    """The torchao post-training quantization config of scheme ``name``."""
    _scheme(name)
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
    :class:`PerTokenSymmetric` stands in for torchao's missing quantizer.
    """
    if name not in QAT_SCHEMES:
        raise ValueError(f"QAT imitates {QAT_SCHEMES}, not {name!r}")
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


def quantize_unet(pipe, scheme: str) -> None:
    """Quantize ``pipe.unet`` with scheme ``name``, through its `labkit.tiers` optimization if it has one
    (raises `labkit.Unavailable` where it cannot run)."""
    s = _scheme(scheme)
    if s.optimization is not None:
        tiers.OPTIMIZATIONS[s.optimization].fn(pipe)
        return
    if (problem := torchao_problem()) is not None:
        raise tiers.Unavailable(f"{scheme}: {problem}")
    from torchao.quantization import quantize_

    quantize_(pipe.unet, ptq_config(scheme))


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
    guide's "75% memory". Used in the INT8 chapter.
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


def unet_coverage(source: str) -> dict:
    """:func:`coverage` of a source's UNet without loading a pipeline: ``shapes`` from its folder, a
    twin built on the meta device (shapes only, no memory). Used in the INT8 chapter."""
    from diffusers import UNet2DConditionModel

    if source == "shapes":
        from labkit.shapes import MODEL_DIR

        return coverage(UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet", use_safetensors=True))
    if source.startswith("twin:"):
        from labkit.models import twin_config

        with torch.device("meta"):
            return coverage(UNet2DConditionModel(**twin_config(source.removeprefix("twin:"))["unet"]))
    raise ValueError(f"unet_coverage takes 'shapes' or a twin such as 'twin:sd15', not {source!r}")


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s weights, quantized tensor subclasses counted by their storage."""
    return tiers._weight_bytes(module)


# ---------------------------------------------------------------------------------------------------
# The experiments
# ---------------------------------------------------------------------------------------------------


def _fresh(source: str, device: str, dtype: str | None, sampler: str, steps: int):
    from labkit.models import load_pipeline
    from labkit.tier1 import use_sampler

    pipe = load_pipeline(source, device=device)
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, sampler, steps)
    if dtype in ("float16", "bfloat16"):
        tiers.OPTIMIZATIONS[{"float16": "fp16", "bfloat16": "bf16"}[dtype]].fn(pipe)
    return pipe


def _row(label: str, scheme: str | None, dtype: str, device: str) -> dict:
    from labkit.measure import environment

    return {
        "label": label,
        "scheme": scheme or "none",
        "base_dtype": dtype,
        **environment(torch.device(device)),
    }


def quantization_speed(
    source: str,
    schemes: Sequence[str | None],
    *,
    device: str,
    steps: int,
    size: int,
    batch: int,
    repeats: int,
    warmup: int,
    dtypes: Sequence[str] = ("float32",),
    sampler: str = "DPM++ 2M",
) -> list[dict]:
    """`labkit.benchmark` records of each scheme (``None``: unquantized) on each base dtype.

    Each record adds ``scheme``, ``base_dtype``, ``unet_weight_bytes`` (quantized storage) and the
    UNet's :func:`coverage`. A scheme that cannot run here (fp8 without an fp8 GPU) gives a record
    with ``status="unavailable"`` and the reason. Used in the INT8 chapter, on a twin.
    """
    records = []
    for dtype in dtypes:
        for scheme in schemes:
            label = f"{scheme or 'unquantized'}, {dtype}"
            pipe = None
            try:
                pipe = _fresh(source, device, dtype, sampler, steps)
                cover = coverage(pipe.unet)
                if scheme is not None:
                    quantize_unet(pipe, scheme)
                result = benchmark(
                    pipe,
                    steps=steps,
                    size=size,
                    batch=batch,
                    repeats=repeats,
                    warmup=warmup,
                    label=label,
                    flops=False,
                )
                result.record |= {
                    "scheme": scheme or "none",
                    "base_dtype": dtype,
                    "unet_weight_bytes": weight_bytes(pipe.unet),
                    **cover,
                }
                records.append(result.record)
            except (tiers.Unavailable, RuntimeError, NotImplementedError) as reason:
                # torchao raises plain errors for dtype/device pairs it has no kernel for
                row = _row(label, scheme, dtype, device)
                records.append(row | {"status": "unavailable", "reason": _reason(reason)})
            finally:
                del pipe
                release_memory(device)
    return records


def load_qat_weights(pipe, scheme: str = "int8_dynamic", folder=None) -> str:
    """Load the QAT-tuned linear weights of ``scheme`` (from :mod:`labkit.shapes.qat`) into ``pipe.unet``.

    By default from the source's variant folder (``labkit/shapes/variants/qat``). Raises
    `labkit.Unavailable` on a source with no QAT variant (a twin: its weights are random), when the
    weights were tuned from another base UNet, or when the UNet is already quantized. Used by
    `labkit.tiers.int8_qat` and the INT8 chapter.
    """
    from labkit.shapes import qat

    source = getattr(pipe, "labkit_source", None)
    if folder is None:
        if source != "shapes":
            raise tiers.Unavailable(
                f"{source} ships no QAT weights (QAT fine-tunes trained weights; a twin's are random): "
                "for speed and memory use int8_dynamic, the same int8 kernels"
            )
        from labkit import shapes

        folder = shapes.MODEL_DIR.parent / "variants" / "qat"
    if any(type(p) is not torch.nn.Parameter for p in pipe.unet.parameters()):
        raise tiers.Unavailable("the UNet is already quantized: load the QAT weights before quantizing")
    if (problem := qat.variant_problem(folder, pipe.unet, scheme)) is not None:
        raise tiers.Unavailable(problem)
    count = qat.load_variant(pipe.unet, folder, scheme)
    return f"{count} QAT-tuned linear tensors loaded from {folder}"


def _reason(error: Exception) -> str:
    """The reason of an unavailable record: labkit's own, or torchao's error, named as such."""
    if isinstance(error, tiers.Unavailable):
        return str(error)
    first = (str(error).splitlines() or [""])[0]
    return f"torchao could not run it here ({type(error).__name__}: {first})"


QUALITY_ROWS: dict[str, tuple[str | None, bool]] = {
    "fp32": (None, False),
    "int8_weight_only": ("int8_weight_only", False),
    "int8_dynamic": ("int8_dynamic", False),
    "int8_dynamic + QAT": ("int8_dynamic", True),
    "int8_int4": ("int8_int4", False),
    "int8_int4 + QAT": ("int8_int4", True),
    "QAT weights, float": (None, True),
}
"""Quality rows of the chapter: label -> (scheme, whether the shipped QAT weights are loaded first)."""


def quantization_quality(
    source: str,
    rows: Sequence[str],
    *,
    device: str,
    steps: int,
    n: int,
    seed: int = 0,
    sampler: str = "DPM++ 2M",
    keep_images: int = 0,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Prompt accuracy, FID and same-seed PSNR against the first row (fp32) on ``shapes``.

    ``rows`` are keys of :data:`QUALITY_ROWS`. Every row draws the same ``n`` held-out prompts from
    the same seeds. Returns the records and the first ``keep_images`` images of each row. A row
    that cannot run here (no torchao, no QAT weights) is a record with ``status="unavailable"``.
    Used in the INT8 chapter.
    """
    records, images_by_row, reference = [], {}, None
    for label in rows:
        if label not in QUALITY_ROWS:
            raise ValueError(f"unknown quality row {label!r}; choose from {list(QUALITY_ROWS)}")
        scheme, qat = QUALITY_ROWS[label]
        pipe = None
        try:
            if qat:
                pipe = _fresh(source, device, None, sampler, steps)
                load_qat_weights(pipe, scheme=scheme or "int8_dynamic")
            else:
                pipe = _fresh(source, device, None, sampler, steps)
            if scheme is not None:
                quantize_unet(pipe, scheme)
            scores = quality.evaluate(pipe, n=n, steps=steps, seed=seed, return_images=True)
            images = scores.pop("images")
            if reference is None:
                reference = images
            images_by_row[label] = images[:keep_images]
            records.append(
                _row(label, scheme, "float32", device)
                | {
                    "qat": qat,
                    "source": source,
                    "sampler": sampler,
                    "steps": steps,
                    "status": "ok",
                    "prompt_accuracy": scores["prompt_accuracy"],
                    "accuracy": scores["accuracy"],
                    "fid": scores["fid"],
                    "psnr_vs_reference": quality.psnr(reference, np.nan_to_num(images)),
                    "n": n,
                    "seconds": scores["seconds"],
                    **image_check(images),
                }
            )
        except (tiers.Unavailable, RuntimeError, NotImplementedError) as reason:
            records.append(
                _row(label, scheme, "float32", device)
                | {"qat": qat, "status": "unavailable", "reason": _reason(reason)}
            )
        finally:
            del pipe
            release_memory(device)
    return records, images_by_row


# ---------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------


def _find(records: Sequence[dict], **match) -> dict | None:
    from labkit.tier1 import find

    return find(records, **match)


def _text(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def quantization_verdict(
    speed: Sequence[dict],
    scores: Sequence[dict],
    profile,
    *,
    margin: Callable[[float, int], float] | None = None,
) -> list[dict]:
    """The rows of the INT8 chapter's verdict, computed from its records with `labkit.lab.judge`.

    ``speed``: :func:`quantization_speed` records (unquantized and int8_dynamic on the profile's half
    dtype and fp32); ``scores``: :func:`quantization_quality` records (fp32 first). The memory claim is
    judged on the UNet's weight bytes against fp32 (the guide's 75% is int8's 1 byte for fp32's 4) and
    on the CUDA peak where there is one; the speed claim against the unquantized model in the same
    dtype; the quality claim ("moderate loss") and the QAT claim on prompt accuracy, with one standard
    error of the fp32 accuracy as the noise floor.
    """
    from labkit.lab import judge
    from labkit.tier1 import match_margin

    margin = margin or match_margin
    half = profile.half_dtype
    rows = []
    fp32 = _find(speed, scheme="none", base_dtype="float32", status="ok")
    int8_32 = _find(speed, scheme="int8_dynamic", base_dtype="float32", status="ok")
    base = _find(speed, scheme="none", base_dtype=half, status="ok") or fp32
    int8 = _find(speed, scheme="int8_dynamic", base_dtype=base["base_dtype"], status="ok")
    saved = 1 - int8_32["unet_weight_bytes"] / fp32["unet_weight_bytes"] if int8_32 else None
    bound = fp32["max_saving_int8"]
    rows.append(
        {
            "claim": "INT8: 75% memory (UNet weights, against fp32)",
            "claimed": "75% less",
            "measured": f"{_text(saved, '.0%')} less ({fp32['unet_weight_bytes'] / 2**20:.1f} -> "
            f"{_text(int8_32 and int8_32['unet_weight_bytes'] / 2**20, '.1f')} MiB); only "
            f"{fp32['linear_share']:.0%} of the weights are in linear layers, so at most "
            f"{bound:.0%}",
            "verdict": judge(saved, 0.75),
        }
    )
    if base.get("peak_allocated_gb") is None or int8 is None:
        peak_text, peak = f"not measurable on this device ({base['device']})", None
    else:
        peak = 1 - int8["peak_allocated_gb"] / base["peak_allocated_gb"]
        peak_text = (
            f"{peak:.0%} less ({base['peak_allocated_gb']:.2f} -> {int8['peak_allocated_gb']:.2f} GB, "
            f"int8 dynamic on {base['base_dtype']})"
        )
    rows.append(
        {
            "claim": "INT8: 75% memory (peak during generation)",
            "claimed": "75% less",
            "measured": peak_text,
            "verdict": judge(peak, 0.75),
        }
    )
    for ref, q in ((base, int8), (fp32, int8_32)) if base is not fp32 else ((fp32, int8_32),):
        speedup = ref["s_per_image"] / q["s_per_image"] if q else None
        rows.append(
            {
                "claim": f"INT8: 2-3x speed (int8 dynamic against {ref['base_dtype']})",
                "claimed": "2-3x",
                "measured": f"{_text(speedup)}x ({ref['s_per_image']:.3g} -> "
                f"{_text(q and q['s_per_image'])} s per image)",
                "verdict": judge(speedup, 2.0, 3.0),
            }
        )
    reference = _find(scores, label="fp32")
    floor = margin(reference["prompt_accuracy"], reference["n"])
    ptq = _find(scores, label="int8_dynamic", status="ok")
    qat = _find(scores, label="int8_dynamic + QAT", status="ok")
    gap = ptq["prompt_accuracy"] - reference["prompt_accuracy"] if ptq else None
    rows.append(
        {
            "claim": "INT8: moderate quality loss (post-training, int8 dynamic)",
            "claimed": f"a loss beyond the noise (> {floor:.3f} prompt accuracy on {reference['n']} images)",
            "measured": f"{_text(gap, '+.3f')} prompt accuracy; FID {reference['fid']:.1f} -> "
            f"{_text(ptq and ptq['fid'], '.1f')}; same-seed PSNR "
            f"{_text(ptq and ptq['psnr_vs_reference'], '.1f')} dB",
            "verdict": "better than claimed: no measurable loss (within the noise)"
            if gap is not None and abs(gap) <= floor
            else judge(gap and -gap, floor, 1.0, tolerance=0),
        }
    )
    rows.append(_qat_row("int8_dynamic", ptq, qat, reference, floor, "INT8 requires QAT"))
    harsh_ptq = _find(scores, label="int8_int4", status="ok")
    harsh_qat = _find(scores, label="int8_int4 + QAT", status="ok")
    if harsh_ptq is not None:
        rows.append(_qat_row("int8_int4", harsh_ptq, harsh_qat, reference, floor, "int4 weights require QAT"))
    return rows


def _qat_row(scheme: str, ptq, qat, reference, floor: float, claim: str) -> dict:
    """Does QAT recover what post-training quantization lost? (a verdict row)."""
    if ptq is None:
        return {"claim": claim, "claimed": "", "measured": "not measured", "verdict": "not measured"}
    lost = reference["prompt_accuracy"] - ptq["prompt_accuracy"]
    if qat is None:
        recovered_text = f"no QAT weights for {scheme} (python -m labkit.shapes.qat --scheme {scheme})"
        verdict = "not measured"
        if lost <= floor:
            verdict = "does not hold: PTQ loses nothing measurable, so QAT has nothing to recover"
    else:
        recovered = qat["prompt_accuracy"] - ptq["prompt_accuracy"]
        recovered_text = (
            f"QAT {qat['prompt_accuracy']:.3f} vs PTQ {ptq['prompt_accuracy']:.3f} "
            f"({recovered:+.3f}); FID {ptq['fid']:.1f} -> {qat['fid']:.1f}; same-seed PSNR "
            f"against fp32 {ptq['psnr_vs_reference']:.1f} -> {qat['psnr_vs_reference']:.1f} dB"
        )
        if lost <= floor:
            verdict = "does not hold: PTQ loses nothing measurable, QAT has nothing to recover"
        elif recovered > floor:
            verdict = "holds: QAT recovers accuracy PTQ lost"
        else:
            verdict = "does not hold: QAT does not recover what PTQ lost"
    return {
        "claim": f"{claim} ({scheme})",
        "claimed": "PTQ loses quality that QAT recovers",
        "measured": f"PTQ {ptq['prompt_accuracy'] - reference['prompt_accuracy']:+.3f} against fp32 "
        f"{reference['prompt_accuracy']:.3f}; {recovered_text}",
        "verdict": verdict,
    }


def qat_info(scheme: str = "int8_dynamic") -> dict:
    """How the shipped QAT weights of ``scheme`` were trained (from the variant's ``config.json``):
    steps, minutes, device, loss, base fingerprint; ``{}`` when there are none. Used in the INT8 chapter.
    """
    import json

    from labkit import shapes

    path = shapes.MODEL_DIR.parent / "variants" / "qat" / "config.json"
    if not path.exists():
        return {}
    entry = json.loads(path.read_text())["schemes"].get(scheme, {})
    keys = ("scheme", "target", "steps", "minutes", "device", "final_loss", "base_fingerprint")
    info = {k: entry.get(k) for k in keys if k in entry}
    config = entry.get("config", {})
    info |= {k: config[k] for k in ("batch_size", "lr") if k in config}
    return info
