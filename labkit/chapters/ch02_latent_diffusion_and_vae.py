"""Chapter 2, latent diffusion and the VAE: what denoising a latent buys, what the VAE costs, what a tuned
decoder changes, and why a VAE in fp16 can return black or NaN images.

- `cost_scenarios`: one UNet evaluation in latent space against the same UNet in pixel space
  (``unet_cost``; FLOPs counted on "meta", and timed on the device); `unet_config` builds either UNet;
- `vae_scenarios`: the twin's VAE encoding and decoding one image (``vae_cost``);
  `generation_flops_ratio` puts the three together over a whole generation;
- `vae_scenarios_on_shapes`: the shipped and the tuned ``shapes`` VAE decoding the same latents (the
  ``vae_compare`` kind: reconstruction PSNR, prompt accuracy, FID); `vae_examples` shows a few;
- `headroom_scenario` and `overflow_scenarios`: the decoder's largest activation (``decoder_headroom``)
  and decodes in fp32, fp16, bf16 and "fp16, upcast", with the decoder as shipped and amplified past fp16's
  limit (``fp16_overflow``); `overflow_images` shows them;
- the helpers behind them: `shapes_latents`, `decode` (reconstructions and encoder fingerprints are `labkit.quality`'s),
  `decoder_headroom`, `amplified_decoder`, `amplification_for`, `tuning_info`, `reads_force_upcast`;
- `verdict_rows`: the chapter's verdict, computed from the records.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from labkit import quality
from labkit.book import Profile, find, judge
from labkit.measurement import image_check
from labkit.models import load_pipeline, quiet_diffusers, twin_config
from labkit.optimizations import apply
from labkit.optimizations.samplers import sampler_step
from labkit.scenarios import Scenario, measurer
from labkit.shapes import VARIANTS_DIR
from labkit.shapes import data as shapes_data

SAMPLER = "DPM++ 2M"
"""The sampler the ``shapes`` sections generate with, at the profile's fast step count."""

FP16_MAX = float(torch.finfo(torch.float16).max)
"""The largest number fp16 holds (65504): a larger activation becomes inf, then NaN."""

DECODES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16, upcast": (torch.float16, torch.float32),  # fp16 latents, an fp32 decoder: diffusers' force_upcast
}
"""The decodes of the overflow demo: name -> (latents dtype, decoder dtype)."""

# ---------------------------------------------------------------------------------------------------
# 1. The same UNet in pixel space, and the VAE (twin)
# ---------------------------------------------------------------------------------------------------


def _factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def unet_config(twin: str, space: str, size: int) -> tuple[dict, int, int]:
    """The UNet config of ``twin`` in ``"latent"`` or ``"pixel"`` space for ``size`` px images, with its
    input channels and side.

    The latent UNet is the twin's own (``size / 8`` px, 4 channels for SD); the pixel UNet is the same
    config with 3 input and output channels, run on the ``size`` px image itself.
    """
    config = twin_config(twin.removeprefix("twin:"))
    unet = dict(config["unet"])
    if space == "latent":
        return unet, unet.get("in_channels", 4), size // _factor(config["vae"])
    if space == "pixel":
        unet |= {"in_channels": 3, "out_channels": 3, "sample_size": size}
        return unet, 3, size
    raise ValueError(f"space is 'latent' or 'pixel', not {space!r}")


def cost_scenarios(
    P: Profile, *, timed: bool = True, spaces: Sequence[str] = ("latent", "pixel")
) -> list[Scenario]:
    """One UNet evaluation for one image, in latent and in pixel space (``unet_cost`` scenarios).

    FLOPs are counted on the "meta" device (no memory needed, even for a pixel UNet that would not fit);
    ``timed`` also builds each UNet on the device with random weights, in the profile's half precision,
    and times it (a UNet that does not fit gives an ``oom`` record, without FLOPs: count them apart,
    with ``timed=False``).
    """
    out = []
    for space in spaces:
        config, channels, side = unet_config(P.twin, space, P.size)
        out.append(
            Scenario(
                kind="unet_cost",
                source=P.twin,
                dtype=P.half_dtype,
                size=P.size,
                repeats=P.repeats if timed else 0,
                warmup=P.warmup if timed else 0,
                options={"unet": config, "side": side},
                label=f"{space} space: {channels}x{side}x{side}",
                notes={"space": space, "input": [1, channels, side, side], "batch": 1},
            )
        )
    return out


def vae_scenarios(P: Profile) -> list[Scenario]:
    """The twin's VAE encoding and decoding one image at the profile's size, in its half precision
    (``vae_cost`` scenarios: FLOPs on "meta", time on the device)."""
    config = twin_config(P.twin.removeprefix("twin:"))["vae"]
    return [
        Scenario(
            kind="vae_cost",
            source=P.twin,
            dtype=P.half_dtype,
            size=P.size,
            repeats=P.repeats,
            warmup=P.warmup,
            options={"vae": config, "part": part},
            label=f"VAE {part}",
            notes={"part": part},
        )
        for part in ("encode", "decode")
    ]


def generation_flops_ratio(latent: dict, pixel: dict, decode: dict, steps: int, cfg: bool = True) -> float:
    """FLOPs of a whole pixel-space generation over a latent-space one (which also pays one VAE decode).

    ``latent`` and ``pixel`` are records of one UNet evaluation for one image, ``decode`` a VAE decode's
    record. With classifier-free guidance every step evaluates the UNet twice.
    """
    evaluations = steps * (2 if cfg else 1)
    return evaluations * pixel["flops"] / (evaluations * latent["flops"] + decode["flops"])


# ---------------------------------------------------------------------------------------------------
# Latents, decoding, the tuned decoder
# ---------------------------------------------------------------------------------------------------


def shapes_latents(pipe, prompts: Sequence[str], *, steps: int, seed: int = 0) -> torch.Tensor:
    """The scaled latents ``pipe`` generates for ``prompts`` (``output_type="latent"``), at the shapes
    model's own guidance; latent ``j`` starts from the noise of seed ``seed + j``, as in
    `labkit.models.generate`, so one set of latents can be decoded by several VAEs and precisions."""
    generators = [torch.Generator("cpu").manual_seed(seed + j) for j in range(len(prompts))]
    with torch.inference_mode():
        out = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=quality.DEFAULT_GUIDANCE,
            generator=generators,
            output_type="latent",
        )
    return out.images


def decode(
    vae, latents: torch.Tensor, dtype: torch.dtype | None = None, *, scaled: bool = True
) -> np.ndarray:
    """Decode latents with ``vae``, in ``dtype`` (a cast copy of the VAE: ``vae`` itself is not changed).

    ``scaled`` latents are the UNet's (divided by ``scaling_factor`` first, as the pipeline does).
    Returns float NHWC images in [0, 1], NaN kept (so that `labkit.measurement.image_check` sees it).
    """
    weights = next(vae.parameters())
    if dtype is not None and dtype != weights.dtype:
        with quiet_diffusers():
            vae = copy.deepcopy(vae).to(dtype)
    z = latents.to(weights.device, next(vae.parameters()).dtype)  # cast, then unscale (as diffusers)
    z = z / vae.config.scaling_factor if scaled else z
    with torch.inference_mode():
        image = vae.decode(z).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1)  # clamp keeps NaN
    return image.permute(0, 2, 3, 1).cpu().numpy()


def tuning_info(folder: str | Path | None = None) -> dict | None:
    """How the tuned ``shapes`` decoder was made (its ``tuning.json``: recipe, time, PSNR before and
    after), or ``None`` where there is none. ``folder``: a tuned VAE folder (default: the shipped one)."""
    path = Path(folder if folder is not None else Path(VARIANTS_DIR) / "vae") / "tuning.json"
    return json.loads(path.read_text()) if path.exists() else None


def _reference_vae(scenario: Scenario, reference: dict, pipe, device):
    """The VAE of the ``reference`` scenario's pipeline: this one's where it builds the same."""
    other = Scenario(**reference)
    if (other.source, other.dtype, other.setup()["optimizations"]) == (
        scenario.source,
        scenario.dtype,
        scenario.setup()["optimizations"],
    ):
        return pipe.vae
    base = load_pipeline(other.source, device=device, dtype=other.dtype)
    apply(base, other.steps_list())
    return base.vae


@measurer("vae_compare", device_independent=True)
def _vae_compare(scenario: Scenario, pipe, device) -> dict:
    """The pipeline's VAE as the last stage on ``shapes``: ``n`` held-out prompts' latents decoded (prompt
    accuracy, FID) and ``n`` real held-out images reconstructed (encode, decode: ``reconstruction_psnr``).

    ``options["reference"]`` (a scenario's setup) adds ``psnr_vs_first``: the same latents decoded by
    the reference pipeline's VAE, against these.
    """
    if scenario.n < 1:
        raise ValueError(f"a vae_compare scenario needs n >= 1 images, not {scenario.n}")
    held = shapes_data.heldout(scenario.n, seed=scenario.seed)
    latents = shapes_latents(pipe, held.prompts, steps=scenario.steps, seed=scenario.seed)
    images = decode(pipe.vae, latents)
    record = {
        "encoder": quality.encoder_fingerprint(pipe.vae),
        "reconstruction_psnr": quality.psnr(held.images, quality.reconstruct(pipe.vae, held.images)),
        "prompt_accuracy": quality.attribute_accuracy(images, held.prompts)["all"],
        "fid": quality.fid(held.images, images),
        "n": scenario.n,
        "steps": scenario.steps,
    }
    if "reference" in scenario.options:
        first = decode(_reference_vae(scenario, scenario.options["reference"], pipe, device), latents)
        record["psnr_vs_first"] = quality.psnr(first, images)
    return record


def vae_scenarios_on_shapes(P: Profile) -> list[Scenario]:
    """The shipped ``shapes`` VAE and its tuned decoder (``swap_vae``) as the last stage of ``shapes``
    (``vae_compare`` scenarios, DPM-Solver++ at the fast step count, ``P.quality_images`` prompts): the
    UNet is the same, so both decode the same latents and the rows differ only by the decoder."""
    shipped = Scenario(
        kind="vae_compare",
        source=P.model,
        optimizations=(sampler_step(SAMPLER, P.fast_steps),),
        steps=P.fast_steps,
        n=P.quality_images,
        label="shipped VAE",
    )
    reference = {"reference": shipped.setup()}
    tuned = shipped.but(optimizations=(*shipped.optimizations, "swap_vae"), label="tuned decoder")
    return [shipped.but(options=reference), tuned.but(options=reference)]


def vae_examples(pipe, vaes: dict, *, n: int = 4, steps: int, seed: int = 0) -> dict:
    """For the eye: ``n`` real held-out images, and for each VAE of ``vaes`` (label -> ``AutoencoderKL``)
    their reconstructions and the generations decoded from the same latents of ``pipe``.

    Returns ``{"real", "prompts", label: {"reconstruction", "generated"}}``. Not a measurement.
    """
    held = shapes_data.heldout(n, seed=seed)
    latents = shapes_latents(pipe, held.prompts, steps=steps, seed=seed)
    shown = {"real": held.images, "prompts": held.prompts}
    for label, vae in vaes.items():
        shown[label] = {
            "reconstruction": quality.reconstruct(vae, held.images),
            "generated": decode(vae, latents),
        }
    return shown


# ---------------------------------------------------------------------------------------------------
# fp16 and the VAE
# ---------------------------------------------------------------------------------------------------


def reads_force_upcast(pipeline_class) -> bool:
    """Whether a diffusers pipeline class's code reads ``vae.config.force_upcast`` (looked up in its source).

    SDXL pipelines do, Stable Diffusion 1.x/2.x's do not.
    """
    return "force_upcast" in inspect.getsource(pipeline_class)


def decoder_headroom(vae, latents: torch.Tensor) -> dict:
    """The largest activation anywhere in the decoder (fp32), and how far it is from fp16's limit.

    Hooks every module of ``post_quant_conv`` and the decoder and records the largest absolute output.
    ``headroom`` is ``65504 / peak``: below 1, fp16 overflows to inf (then NaN).
    """
    peaks: dict[str, float] = {}
    hooks = []
    modules = [("post_quant_conv", vae.post_quant_conv)] if vae.post_quant_conv is not None else []
    modules += [(f"decoder.{n}" if n else "decoder", m) for n, m in vae.decoder.named_modules()]
    for name, module in modules:

        def hook(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                peaks[name] = max(peaks.get(name, 0.0), float(output.detach().abs().max()))

        hooks.append(module.register_forward_hook(hook))
    try:
        decode(vae, latents, torch.float32)
    finally:
        for h in hooks:
            h.remove()
    where = max(peaks, key=peaks.get)
    return {"peak_activation": peaks[where], "where": where, "headroom": FP16_MAX / peaks[where]}


def amplified_decoder(vae, factor: float):
    """A copy of ``vae`` whose decoder computes the same images with activations ``factor`` times larger.

    The decoder's residual stream is scaled up where it is written (``conv_in``, the last convolution
    of every resnet branch, every attention output, the biases of the shortcuts and upsampling
    convolutions); the group norms that read it are scale-invariant, so in exact arithmetic the
    output does not change. Stable Diffusion's VAE is like that by training: fine in fp32, with
    activations beyond fp16's range. (``sdxl-vae-fp16-fix`` did the reverse: scaled them down.)
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    vae = copy.deepcopy(vae)
    decoder = vae.decoder
    with torch.no_grad():
        decoder.conv_in.weight.mul_(factor)
        decoder.conv_in.bias.mul_(factor)
        for module in decoder.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.mul_(factor)
                module.conv2.bias.mul_(factor)
                if module.conv_shortcut is not None and module.conv_shortcut.bias is not None:
                    module.conv_shortcut.bias.mul_(factor)
            elif isinstance(module, Attention):
                module.to_out[0].weight.mul_(factor)
                module.to_out[0].bias.mul_(factor)
            elif isinstance(module, Upsample2D) and getattr(module, "conv", None) is not None:
                module.conv.bias.mul_(factor)
    return vae


def amplification_for(vae, latents: torch.Tensor, peak: float, *, trial: float = 1000.0) -> float:
    """The `amplified_decoder` factor that brings the decoder's largest activation to ``peak``.

    Activations grow in proportion to the factor, so one trial amplification measures the slope.
    """
    measured = decoder_headroom(amplified_decoder(vae, trial), latents)["peak_activation"]
    return trial * peak / measured


# the latents and decoder of the last demo setup: the decodes of one setup share them
_DEMO: dict[str, dict] = {}


def _demo_decoder(scenario: Scenario, pipe, device) -> dict:
    """The scenario's latents (``options["prompts"]``), the pipeline's decoder amplified until its largest
    activation reaches ``options["peak"]`` (None: as shipped) with the factor (rounded to 0.1) and its
    peak activation, and the shipped decoder's fp32 images."""
    setup = {k: v for k, v in scenario.setup().items() if k != "options"}
    setup["options"] = {k: v for k, v in scenario.options.items() if k != "decode"}
    key = json.dumps([setup, str(device)], sort_keys=True)
    if key not in _DEMO:
        latents = shapes_latents(pipe, scenario.options["prompts"], steps=scenario.steps, seed=scenario.seed)
        peak = scenario.options.get("peak")
        factor = 1.0 if peak is None else round(amplification_for(pipe.vae, latents, peak), 1)
        vae = pipe.vae if factor == 1 else amplified_decoder(pipe.vae, factor)
        _DEMO.clear()
        _DEMO[key] = {
            "latents": latents,
            "amplification": factor,
            "vae": vae,
            "headroom": decoder_headroom(vae, latents),
            "reference": decode(pipe.vae, latents, torch.float32),
        }
    return _DEMO[key]


@measurer("decoder_headroom")
def _decoder_headroom(scenario: Scenario, pipe, device) -> dict:
    """The largest activation of the pipeline's decoder (fp32) for the latents of ``options["prompts"]``,
    where it is, and fp16's limit over it (``headroom``)."""
    demo = _demo_decoder(scenario, pipe, device)
    return {"amplification": demo["amplification"], **demo["headroom"]}


@measurer("fp16_overflow")
def _fp16_overflow(scenario: Scenario, pipe, device) -> dict:
    """The latents of ``options["prompts"]`` decoded as ``options["decode"]`` says (a key of `DECODES`),
    by the pipeline's decoder as shipped or amplified to ``options["peak"]``: NaN and black images, and
    the PSNR against the shipped decoder in fp32 (None where an image is NaN)."""
    demo = _demo_decoder(scenario, pipe, device)
    latent_dtype, vae_dtype = DECODES[scenario.options["decode"]]
    decoded = decode(demo["vae"], demo["latents"].to(latent_dtype), vae_dtype)
    check = image_check(decoded)
    return {
        "amplification": demo["amplification"],
        "peak_activation": demo["headroom"]["peak_activation"],
        "status": "nan" if check["nan_images"] else "ok",
        **check,
        "psnr_vs_fp32": None if check["nan_images"] else quality.psnr(demo["reference"], decoded),
    }


def _demo(P: Profile, kind: str, prompts: Sequence[str], **options) -> Scenario:
    return Scenario(
        kind=kind,
        source=P.model,
        optimizations=(sampler_step(SAMPLER, P.fast_steps),),
        steps=P.fast_steps,
        options={"prompts": list(prompts), **options},
    )


def headroom_scenario(P: Profile, prompts: Sequence[str]) -> Scenario:
    """The largest activation of the shipped ``shapes`` decoder for the latents of ``prompts``."""
    return _demo(P, "decoder_headroom", prompts).but(label="decoder headroom")


def overflow_scenarios(P: Profile, prompts: Sequence[str]) -> list[Scenario]:
    """The latents of ``prompts`` decoded in each way of `DECODES`, by the shipped ``shapes`` decoder and
    by a copy amplified until its largest activation is twice fp16's limit (``fp16_overflow``)."""
    return [
        _demo(P, "fp16_overflow", prompts, peak=peak, decode=name).but(label=name)
        for peak in (None, 2 * FP16_MAX)
        for name in DECODES
    ]


def overflow_images(vae, latents: torch.Tensor, records: Sequence[dict]) -> np.ndarray:
    """For the eye: ``latents`` decoded as each `overflow_scenarios` record says (its ``label``, a key of
    `DECODES`, and its ``amplification``): records x N x H x W x 3, NaN kept. Not a measurement."""
    decoders: dict[float, object] = {}
    rows = []
    for r in records:
        factor = r["amplification"]
        if factor not in decoders:
            decoders[factor] = vae if factor == 1 else amplified_decoder(vae, factor)
        latent_dtype, vae_dtype = DECODES[r["label"]]
        rows.append(decode(decoders[factor], latents.to(latent_dtype), vae_dtype))
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------------


def verdict_rows(
    flops: Sequence[dict],
    cost: Sequence[dict],
    vae: Sequence[dict],
    vaes: Sequence[dict],
    overflow: Sequence[dict],
    P: Profile,
) -> list[dict]:
    """The rows of the chapter's verdict, computed from its records with `labkit.book.judge`.

    ``flops``: the FLOPs-only records of `cost_scenarios` (latent, pixel); ``cost``: the timed ones;
    ``vae``: `vae_scenarios` records; ``vaes``: `vae_scenarios_on_shapes` records (shipped first);
    ``overflow``: `overflow_scenarios` records.
    """
    latent, pixel = find(flops, space="latent"), find(flops, space="pixel")
    timed = {r["space"]: r for r in cost}
    decoder = find(vae, part="decode")
    flops_ratio = pixel["flops"] / latent["flops"]
    generation = generation_flops_ratio(latent, pixel, decoder, P.fast_steps) if "flops" in decoder else None
    if timed["pixel"]["status"] == "oom":
        time_ratio = None
        time_text = f"the pixel-space UNet did not fit in memory ({timed['pixel']['device']})"
    elif any(timed[s]["status"] != "ok" or "seconds" not in timed[s] for s in ("latent", "pixel")):
        time_ratio, time_text = None, "not timed"
    else:
        seconds = (timed["pixel"]["seconds"], timed["latent"]["seconds"])
        time_ratio = seconds[0] / seconds[1]
        time_text = f"{time_ratio:.3g}x ({seconds[0]:.3g} s against {seconds[1]:.3g} s)"
    shipped, tuned = vaes[0], vaes[1]
    gain = tuned["reconstruction_psnr"] - shipped["reconstruction_psnr"]
    fp16 = find([r for r in overflow if r["amplification"] == 1], label="fp16")
    if fp16["nan_images"]:
        fp16_text, fp16_verdict = f"{fp16['nan_images']} NaN images", "does not hold"
    else:
        fp16_text = f"{fp16['psnr_vs_fp32']:.1f} dB against the fp32 decode, no NaN"
        fp16_verdict = judge(fp16["psnr_vs_fp32"], 40, math.inf, tolerance=0)
    claim = "50-200x compute reduction"
    return [
        {
            "claim": f"latent diffusion: {claim} (one UNet evaluation, FLOPs)",
            "claimed": "50-200x",
            "measured": f"{flops_ratio:.3g}x ({pixel['flops'] / 1e9:.3g} GFLOP against "
            f"{latent['flops'] / 1e9:.3g} GFLOP)",
            "verdict": judge(flops_ratio, 50, 200),
        },
        {
            "claim": f"latent diffusion: {claim} (one UNet evaluation, time)",
            "claimed": "50-200x",
            "measured": time_text,
            "verdict": judge(time_ratio, 50, 200),
        },
        {
            "claim": f"latent diffusion: {claim} (whole generation, {P.fast_steps} steps with "
            "guidance, VAE decode included)",
            "claimed": "50-200x",
            "measured": "not measured" if generation is None else f"{generation:.3g}x",
            "verdict": judge(generation, 50, 200),
        },
        {
            "claim": "a tuned VAE (sd-vae-ft-mse) gives better images",
            "claimed": "higher reconstruction PSNR (>= +0.5 dB)",
            "measured": f"{gain:+.2f} dB ({shipped['reconstruction_psnr']:.2f} -> "
            f"{tuned['reconstruction_psnr']:.2f}); prompt accuracy {shipped['prompt_accuracy']:.3f} -> "
            f"{tuned['prompt_accuracy']:.3f}; FID {shipped['fid']:.1f} -> {tuned['fid']:.1f}",
            "verdict": judge(gain, 0.5, math.inf, tolerance=0),
        },
        {
            "claim": "FP16 VAE decode: negligible quality loss",
            "claimed": ">= 40 dB PSNR against fp32, no NaN",
            "measured": fp16_text,
            "verdict": fp16_verdict,
        },
    ]
