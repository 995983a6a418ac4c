"""Chapter 2, latent diffusion and the VAE: its scenarios, chapter kinds, decoding helpers and verdict.

All on the CPU with tiny models (twin:tiny, an untrained tiny shapes pipeline saved to a folder).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import labkit
from labkit import quality
from labkit.book import PROFILES
from labkit.chapters import ch02_latent_diffusion_and_vae as ch
from labkit.shapes import make_prompt

VERDICTS = {"holds", "below the claim", "above the claim", "not measured", "does not hold"}


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """A folder holding an untrained tiny shapes pipeline (same structure as the shipped model)."""
    from labkit.shapes.build import ModelConfig, build_pipeline
    from labkit.shapes.tokenizer import fit_tokenizer

    folder = tmp_path_factory.mktemp("tiny-shapes")
    torch.manual_seed(0)
    pipe = build_pipeline(ModelConfig.tiny(), folder / "tok")
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    fit_tokenizer(folder / "model" / "tokenizer")
    return folder / "model"


@pytest.fixture(scope="module")
def tiny_vae(tiny_shapes):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_shapes / "vae", use_safetensors=True).eval()


def _profile(**changes):
    return dataclasses.replace(PROFILES["ci"], **changes)


def _measure(scenarios, tmp_path):
    return labkit.measure(scenarios, tmp_path / "records", progress=False, say=None)


# --------------------------------------------------------------------------------------------------
# the UNet in latent and pixel space, the VAE (twin)
# --------------------------------------------------------------------------------------------------


def test_unet_config_latent_and_pixel():
    latent, channels, side = ch.unet_config("twin:tiny", "latent", 64)
    assert (channels, side) == (4, 8)
    pixel, channels, side = ch.unet_config("twin:tiny", "pixel", 64)
    assert (channels, side) == (3, 64) and pixel["in_channels"] == pixel["out_channels"] == 3
    assert "in_channels" not in latent or latent["in_channels"] == 4
    with pytest.raises(ValueError, match="latent"):
        ch.unet_config("twin:tiny", "x", 64)


def test_cost_scenarios_pixel_against_latent(tmp_path):
    P = _profile(repeats=1, warmup=0)
    flops = ch.cost_scenarios(P, timed=False)
    assert all(s.kind == "unet_cost" and s.repeats == 0 for s in flops)
    latent, pixel = _measure(flops, tmp_path)
    assert latent["input"] == [1, 4, 8, 8] and pixel["input"] == [1, 3, 64, 64]
    assert (latent["space"], pixel["space"]) == ("latent", "pixel")
    assert "seconds" not in latent
    # convolutions scale with the number of positions (8 x 8 = 64), attention with its square
    assert pixel["flops_convolution"] / latent["flops_convolution"] == pytest.approx(64, rel=0.05)
    assert pixel["flops_attention"] / latent["flops_attention"] > 1000
    (timed,) = _measure(
        ch.cost_scenarios(_profile(size=32, repeats=1, warmup=0), spaces=("latent",)), tmp_path
    )
    assert timed["status"] == "ok" and timed["seconds"] > 0 and timed["input"] == [1, 4, 4, 4]


@pytest.mark.slow
def test_sdxl_unet_counts_on_meta(tmp_path):
    P = _profile(twin="twin:sdxl", size=256)
    (latent,) = _measure(ch.cost_scenarios(P, timed=False, spaces=("latent",)), tmp_path)
    assert latent["flops"] > 0 and latent["input"] == [1, 4, 32, 32]


def test_vae_scenarios_and_generation_ratio(tmp_path):
    encode, decode = _measure(ch.vae_scenarios(_profile(repeats=1, warmup=0)), tmp_path)
    assert (encode["part"], decode["part"]) == ("encode", "decode")
    assert decode["flops"] > 0 and decode["seconds"] > 0
    latent, pixel = {"flops": 1.0}, {"flops": 100.0}
    assert ch.generation_flops_ratio(latent, pixel, {"flops": 0.0}, 10) == pytest.approx(100)
    assert ch.generation_flops_ratio(latent, pixel, {"flops": 20.0}, 10) == pytest.approx(2000 / 40)
    assert ch.generation_flops_ratio(latent, pixel, {"flops": 20.0}, 10, cfg=False) == pytest.approx(
        1000 / 30
    )


# --------------------------------------------------------------------------------------------------
# decoding, the tuned decoder, fp16
# --------------------------------------------------------------------------------------------------


def test_decode_keeps_the_vae_and_returns_images(tiny_vae):
    latents = torch.randn(2, 4, 16, 16)
    images = ch.decode(tiny_vae, latents, torch.bfloat16)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert next(tiny_vae.parameters()).dtype == torch.float32  # a cast copy decoded, not the VAE


def test_reconstruct_and_encoder_fingerprint(tiny_vae):
    images = np.random.default_rng(0).random((3, 64, 64, 3), dtype=np.float32)
    recon = quality.reconstruct(tiny_vae, images, batch_size=2)
    assert recon.shape == images.shape and 0 <= recon.min() and recon.max() <= 1
    other = ch.amplified_decoder(tiny_vae, 2.0)  # the decoder changes, the encoder does not
    assert quality.encoder_fingerprint(other) == quality.encoder_fingerprint(tiny_vae)
    with torch.no_grad():
        other.encoder.conv_in.bias.add_(1.0)
    assert quality.encoder_fingerprint(other) != quality.encoder_fingerprint(tiny_vae)


def test_tuning_info(tmp_path):
    assert ch.tuning_info(tmp_path) is None
    (tmp_path / "tuning.json").write_text('{"steps": 3}')
    assert ch.tuning_info(tmp_path) == {"steps": 3}


def test_shipped_tuned_decoder_shares_the_shipped_encoder():
    """The tuned decoder must share the shipped model's encoder, or it decodes another latent space."""
    from diffusers import AutoencoderKL

    from labkit.shapes import MODEL_DIR, VARIANTS_DIR

    if not (VARIANTS_DIR / "vae" / "config.json").exists() or not (MODEL_DIR / "vae").exists():
        pytest.skip("the shapes model or its tuned VAE is not shipped yet")
    shipped = AutoencoderKL.from_pretrained(MODEL_DIR / "vae", use_safetensors=True)
    tuned = AutoencoderKL.from_pretrained(VARIANTS_DIR / "vae", use_safetensors=True)
    assert quality.encoder_fingerprint(shipped) == quality.encoder_fingerprint(tuned)
    assert quality.encoder_fingerprint(tuned) == ch.tuning_info()["encoder_fingerprint"]
    assert tuned.config.scaling_factor == shipped.config.scaling_factor


def test_amplified_decoder_and_headroom(tiny_vae):
    latents = torch.randn(2, 4, 16, 16)
    reference = ch.decode(tiny_vae, latents, torch.float32)
    same = ch.decode(ch.amplified_decoder(tiny_vae, 100.0), latents, torch.float32)
    assert np.abs(same - reference).max() < 1e-3  # the same function
    base = ch.decoder_headroom(tiny_vae, latents)
    assert base["headroom"] == pytest.approx(65504 / base["peak_activation"])
    factor = ch.amplification_for(tiny_vae, latents, 2 * 65504)
    peak = ch.decoder_headroom(ch.amplified_decoder(tiny_vae, factor), latents)["peak_activation"]
    assert peak == pytest.approx(2 * 65504, rel=0.05)


def test_reads_force_upcast():
    import diffusers

    assert ch.reads_force_upcast(diffusers.StableDiffusionXLPipeline)
    assert not ch.reads_force_upcast(diffusers.StableDiffusionPipeline)


PROMPTS = [
    make_prompt("circle", "red", "top left", "small"),
    make_prompt("square", "blue", "center", "large"),
]


@pytest.mark.slow
def test_headroom_and_fp16_overflow_scenarios(tiny_shapes, tmp_path):
    P = _profile(model=str(tiny_shapes), fast_steps=1)
    (headroom,) = _measure([ch.headroom_scenario(P, PROMPTS)], tmp_path)
    assert headroom["label"] == "decoder headroom" and headroom["amplification"] == 1.0
    assert headroom["headroom"] == pytest.approx(ch.FP16_MAX / headroom["peak_activation"])
    records = _measure(ch.overflow_scenarios(P, PROMPTS), tmp_path)
    assert [r["label"] for r in records] == list(ch.DECODES) * 2
    by = {(r["label"], r["amplification"] == 1): r for r in records}
    assert all(by[(m, True)]["nan_images"] == 0 for m in ch.DECODES)
    assert by[("fp32", True)]["peak_activation"] == pytest.approx(headroom["peak_activation"])
    amplified = by[("fp16", False)]
    assert amplified["peak_activation"] == pytest.approx(2 * ch.FP16_MAX, rel=0.05)
    assert amplified["nan_images"] == 2 and amplified["status"] == "nan" and amplified["psnr_vs_fp32"] is None
    for mode in ("fp32", "bf16", "fp16, upcast"):
        assert by[(mode, False)]["nan_images"] == 0
    assert by[("fp32", False)]["psnr_vs_fp32"] > 60
    # the images for the eye, decoded as the records say
    pipe = labkit.load_pipeline(str(tiny_shapes), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    latents = ch.shapes_latents(pipe, PROMPTS, steps=1)
    images = ch.overflow_images(pipe.vae, latents, records)
    assert images.shape == (8, 2, 64, 64, 3)
    assert np.isnan(images[records.index(amplified)]).any()


@pytest.mark.slow
def test_vae_compare_decodes_the_same_latents(tmp_path):
    from labkit.shapes import MODEL_DIR, VARIANTS_DIR

    if not (VARIANTS_DIR / "vae" / "config.json").exists() or not (MODEL_DIR / "vae").exists():
        pytest.skip("the shapes model or its tuned VAE is not shipped yet")
    P = _profile(fast_steps=1, quality_images=3)
    shipped, tuned = ch.vae_scenarios_on_shapes(P)
    assert "swap_vae" in tuned.optimizations and shipped.options == tuned.options
    records = _measure([shipped, tuned], tmp_path)
    assert [r["label"] for r in records] == ["shipped VAE", "tuned decoder"]
    assert records[0]["psnr_vs_first"] == 100.0 and 20 < records[1]["psnr_vs_first"] < 100
    assert records[0]["encoder"] == records[1]["encoder"]
    assert all(r["n"] == 3 and r["reconstruction_psnr"] > 20 for r in records)
    assert records[1]["reconstruction_psnr"] != records[0]["reconstruction_psnr"]


def test_vae_examples(tiny_shapes, tiny_vae):
    pipe = labkit.load_pipeline(str(tiny_shapes), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    shown = ch.vae_examples(pipe, {"a": tiny_vae}, n=2, steps=1)
    assert shown["real"].shape == (2, 64, 64, 3) and len(shown["prompts"]) == 2
    assert shown["a"]["generated"].shape == shown["a"]["reconstruction"].shape == (2, 64, 64, 3)


# --------------------------------------------------------------------------------------------------
# verdict
# --------------------------------------------------------------------------------------------------


def test_verdict_from_records():
    flops = [{"space": "latent", "flops": 1e9}, {"space": "pixel", "flops": 1e11}]
    cost = [
        {"space": "latent", "seconds": 0.01, "status": "ok", "device": "d"},
        {"space": "pixel", "status": "oom", "device": "d"},
    ]
    vae = [{"part": "decode", "flops": 1e9}]
    vaes = [
        {"reconstruction_psnr": 30.0, "prompt_accuracy": 0.8, "fid": 20.0},
        {"reconstruction_psnr": 31.0, "prompt_accuracy": 0.8, "fid": 19.0},
    ]
    overflow = [{"label": "fp16", "amplification": 1.0, "nan_images": 0, "psnr_vs_fp32": 70.0}]
    rows = ch.verdict_rows(flops, cost, vae, vaes, overflow, PROFILES["gpu"])
    assert [r["verdict"] for r in rows] == ["holds", "not measured", "holds", "holds", "holds"]
    assert "did not fit" in rows[1]["measured"]
    cost[1] = {"space": "pixel", "seconds": 1.0, "status": "ok", "device": "d"}
    overflow[0] |= {"nan_images": 2, "psnr_vs_fp32": None}
    rows = ch.verdict_rows(flops, cost, vae, vaes, overflow, PROFILES["gpu"])
    assert rows[1]["verdict"] == "holds" and rows[4]["verdict"] == "does not hold"
    assert all(r["verdict"] in VERDICTS for r in rows)
