"""Unit tests of the tier 1 chapters' helpers: `labkit.tier1`, `labkit.shapes.tune_vae`, their plots.

All on the CPU with tiny models (twin:tiny, an untrained tiny shapes pipeline): seconds in all.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from labkit import lab, plots, tier1  # noqa: E402 (after the backend is chosen)
from labkit.shapes import tune_vae  # noqa: E402

VERDICTS = {"holds", "below the claim", "above the claim", "not measured"}


# --------------------------------------------------------------------------------------------------
# fixtures: a tiny untrained shapes pipeline saved to a folder, and its VAE
# --------------------------------------------------------------------------------------------------


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
    return tune_vae.load_vae(tiny_shapes / "vae")


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def test_find_and_margin_and_wording():
    rows = [{"a": 1, "b": 2}, {"a": 1, "b": 3}]
    assert tier1.find(rows, a=1) is rows[0]
    assert tier1.find(rows, b=3) is rows[1]
    assert tier1.find(rows, a=2) is None
    assert tier1.match_margin(0.5, 100) == pytest.approx(0.05)
    assert tier1.match_margin(1.0, 8) > 0  # a perfect score on few images is still uncertain
    assert tier1.fewer_is_better("below the claim").startswith("holds")
    assert tier1.fewer_is_better("above the claim").startswith("does not hold")
    assert tier1.fewer_is_better("holds") == "holds"


def test_profiles_have_the_sampler_fields():
    for profile in lab.PROFILES.values():
        assert list(profile.sampler_steps) == sorted(profile.sampler_steps)
        assert profile.ddpm_steps >= profile.steps
        assert isinstance(profile.as_dict()["sampler_steps"], list)
    gpu = lab.PROFILES["gpu"]
    assert gpu.ddpm_steps == 1000 and {15, 20, 50} <= set(gpu.sampler_steps)


# --------------------------------------------------------------------------------------------------
# chapter 1: samplers
# --------------------------------------------------------------------------------------------------


def test_use_sampler_starts_from_the_original_config(tiny):
    original = type(tiny.scheduler).__name__
    tier1.use_sampler(tiny, "DPM++ 2M Karras", 5)
    assert tiny.scheduler.config.use_karras_sigmas
    tier1.use_sampler(tiny, "Euler", 7)
    assert type(tiny.scheduler).__name__ == "EulerDiscreteScheduler"
    assert not tiny.scheduler.config.get("use_karras_sigmas", False)  # Karras did not leak
    assert tiny.labkit_call["steps"] == 7
    samplers = [c for c in tiny.labkit_applied if c.name in ("dpm_solver", "euler")]
    assert [c.name for c in samplers] == ["euler"]
    assert type(tiny.labkit_original_scheduler).__name__ == original
    with pytest.raises(ValueError):
        tier1.use_sampler(tiny, "nope", 3)


def test_sampler_speed_records(tiny):
    records = tier1.sampler_speed(tiny, [("DDIM", 2), ("DPM++ 2M", 1)], size=64, repeats=1, warmup=0)
    assert [r["sampler"] for r in records] == ["DDIM", "DPM++ 2M"]
    assert [r["label"] for r in records] == ["DDIM 2", "DPM++ 2M 1"]
    assert all(r["status"] == "ok" and r["s_per_image"] > 0 for r in records)
    assert records[0]["denoiser_evaluations"] == 2


def test_steps_to_match():
    rows = [
        {"sampler": "A", "steps": s, "prompt_accuracy": acc, "fid": f}
        for s, acc, f in ((5, 0.2, 90), (10, 0.6, 40), (20, 0.8, 21))
    ]
    assert tier1.steps_to_match(rows, "A", 0.6) == 10
    assert tier1.steps_to_match(rows, "A", 0.65, margin=0.05) == 10
    assert tier1.steps_to_match(rows, "A", 0.9) is None
    assert tier1.steps_to_match(rows, "A", 20, metric="fid", margin=2) == 20
    assert tier1.steps_to_match(rows, "A", 40, metric="fid") == 10
    assert tier1.steps_to_match(rows, "B", 0.1) is None


def test_sampler_quality_and_images(tiny_shapes):
    import labkit

    pipe = labkit.load_pipeline(str(tiny_shapes), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    records = tier1.sampler_quality(pipe, [("DDIM", 2), ("DPM++ 2M", 2)], n=4)
    assert [r["sampler"] for r in records] == ["DDIM", "DPM++ 2M"]
    assert all(0 <= r["prompt_accuracy"] <= 1 and math.isfinite(r["fid"]) for r in records)
    assert records[0]["denoiser_evaluations"] == 2 and records[0]["n"] == 4
    images, labels = tier1.sampler_images(
        pipe, [("DDIM", 1), ("Euler", 1)], ["a small red circle at the top"]
    )
    assert images.shape == (2, 64, 64, 3) and labels == ["DDIM 1", "Euler 1"]


def _speed(sampler, steps, seconds, memory=None):
    return {"sampler": sampler, "steps": steps, "s_per_image": seconds, "peak_allocated_gb": memory,
            "device": "test device"}  # fmt: skip


def _score(sampler, steps, accuracy, fid, n=100):
    return {"sampler": sampler, "steps": steps, "prompt_accuracy": accuracy, "fid": fid, "n": n,
            "label": f"{sampler} {steps}"}  # fmt: skip


def test_samplers_verdict_from_records():
    P = lab.PROFILES["gpu"]
    speed = [
        _speed("DDPM", 1000, 40.0, 3.0),
        _speed("PNDM", 50, 2.0, 3.0),
        _speed("DDIM", 50, 2.0, 3.0),
        _speed("DPM++ 2M", 20, 0.8, 3.0),
    ]
    scores = [_score("DDIM", s, a, f) for s, a, f in ((20, 0.5, 40), (50, 0.8, 20), (100, 0.82, 19))]
    scores += [_score("DPM++ 2M", s, a, f) for s, a, f in ((10, 0.7, 25), (15, 0.8, 20), (20, 0.81, 20))]
    rows = tier1.samplers_verdict(speed, scores, P)
    assert all(set(r) == {"claim", "claimed", "measured", "verdict"} for r in rows)
    by_claim = {r["claim"]: r for r in rows}
    assert by_claim["DDIM 50: good balance"]["verdict"] == "holds"  # 0.8 / 0.82
    assert by_claim["10-20x speed-up, against PNDM 50 (SD 1.x's default)"]["verdict"] == "below the claim"
    assert by_claim["30% memory reduction"]["verdict"] == "below the claim"  # same memory
    assert "15 steps" in rows[-1]["measured"] and rows[-1]["verdict"] == "holds"
    # on a CPU there is no memory counter: "not measured", never a fake pass
    cpu = [dict(r, peak_allocated_gb=None) for r in speed]
    memory = [r for r in tier1.samplers_verdict(cpu, scores, P) if r["claim"] == "30% memory reduction"]
    assert memory[0]["verdict"] == "not measured" and "not measurable" in memory[0]["measured"]


# --------------------------------------------------------------------------------------------------
# chapter 2: latent diffusion and the VAE
# --------------------------------------------------------------------------------------------------


def test_count_flops_groups_by_kind():
    with torch.device("meta"):
        conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        linear = torch.nn.Linear(8, 8)
        x = torch.randn(1, 3, 16, 16)

        def fn():
            y = conv(x).flatten(2).transpose(1, 2)  # (1, 256, 8)
            y = linear(y)
            return torch.bmm(y, y.transpose(1, 2))

        counts = tier1.count_flops(fn)
    assert counts["flops_convolution"] == 2 * 3 * 9 * 8 * 256
    assert counts["flops_linear"] == 2 * 256 * 8 * 8
    assert counts["flops_attention"] == 2 * 256 * 256 * 8
    assert counts["flops"] == sum(counts[f"flops_{k}"] for k in tier1.FLOP_KINDS)


def test_denoising_cost_pixel_against_latent():
    flops_only = tier1.denoising_cost("twin:tiny", 64, device="cpu", dtype="float32", repeats=0, warmup=0)
    latent, pixel = flops_only
    assert latent["input"] == [1, 4, 8, 8] and pixel["input"] == [1, 3, 64, 64]
    assert "s_per_evaluation" not in latent
    # convolutions scale with the number of positions (8 x 8 = 64), attention with its square
    assert pixel["flops_convolution"] / latent["flops_convolution"] == pytest.approx(64, rel=0.05)
    assert pixel["flops_attention"] / latent["flops_attention"] > 1000
    timed = tier1.denoising_cost(
        "twin:tiny", 32, device="cpu", dtype=torch.float32, repeats=1, warmup=0, spaces=("latent",)
    )
    assert timed[0]["status"] == "ok" and timed[0]["s_per_evaluation"] > 0
    with pytest.raises(ValueError):
        tier1.denoising_cost(
            "twin:tiny", 64, device="cpu", dtype="float32", repeats=0, warmup=0, spaces=("x",)
        )


def test_sdxl_unet_inputs_count_on_meta():
    latent = tier1.denoising_cost(
        "twin:sdxl", 256, device="cpu", dtype="float32", repeats=0, warmup=0, spaces=("latent",)
    )[0]
    assert latent["flops"] > 0 and latent["input"] == [1, 4, 32, 32]


def test_vae_cost_and_generation_ratio():
    encode, decode = tier1.vae_cost("twin:tiny", 64, device="cpu", dtype="float32", repeats=1, warmup=0)
    assert (encode["part"], decode["part"]) == ("encode", "decode")
    assert decode["flops"] > 0 and decode["s_per_image"] > 0
    latent, pixel = {"flops": 1.0}, {"flops": 100.0}
    assert tier1.generation_flops_ratio(latent, pixel, {"flops": 0.0}, 10) == pytest.approx(100)
    assert tier1.generation_flops_ratio(latent, pixel, {"flops": 20.0}, 10) == pytest.approx(2000 / 40)
    assert tier1.generation_flops_ratio(latent, pixel, {"flops": 20.0}, 10, cfg=False) == pytest.approx(
        1000 / 30
    )


def test_decode_keeps_the_vae_and_returns_images(tiny_vae):
    latents = torch.randn(2, 4, 16, 16)
    images = tier1.decode(tiny_vae, latents, torch.bfloat16)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert next(tiny_vae.parameters()).dtype == torch.float32  # a cast copy decoded, not the VAE


def test_amplified_decoder_and_the_fp16_overflow(tiny_vae):
    latents = torch.randn(2, 4, 16, 16)
    reference = tier1.decode(tiny_vae, latents, torch.float32)
    same = tier1.decode(tier1.amplified_decoder(tiny_vae, 100.0), latents, torch.float32)
    assert np.abs(same - reference).max() < 1e-3  # the same function
    base = tier1.decoder_headroom(tiny_vae, latents)
    assert base["headroom"] == pytest.approx(65504 / base["peak_activation"])
    factor = tier1.amplification_for(tiny_vae, latents, 2 * 65504)
    peak = tier1.decoder_headroom(tier1.amplified_decoder(tiny_vae, factor), latents)["peak_activation"]
    assert peak == pytest.approx(2 * 65504, rel=0.05)
    records, images = tier1.overflow_demo(tiny_vae, latents, [1.0, factor])
    assert images.shape == (8, 2, 64, 64, 3)
    status = {(r["label"], r["amplification"]): r for r in records}
    assert all(status[(m, 1.0)]["nan_images"] == 0 for m in ("fp32", "fp16", "bf16", "fp16, upcast"))
    assert status[("fp16", factor)]["nan_images"] == 2 and status[("fp16", factor)]["status"] == "nan"
    for mode in ("fp32", "bf16", "fp16, upcast"):
        assert status[(mode, factor)]["nan_images"] == 0
    assert status[("fp32", factor)]["psnr_vs_fp32"] > 60


def test_reads_force_upcast():
    import diffusers

    assert tier1.reads_force_upcast(diffusers.StableDiffusionXLPipeline)
    assert not tier1.reads_force_upcast(diffusers.StableDiffusionPipeline)


def test_compare_vaes(tiny_shapes, tiny_vae):
    import labkit

    pipe = labkit.load_pipeline(str(tiny_shapes), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    other = tier1.amplified_decoder(tiny_vae, 3.0)  # the same images: a stand-in for a second VAE
    records, shown = tier1.compare_vaes(pipe, {"a": tiny_vae, "b": other}, n=3, steps=1, show=2)
    assert [r["label"] for r in records] == ["a", "b"]
    assert records[0]["psnr_vs_first"] == 100.0 and records[1]["psnr_vs_first"] > 50
    assert records[0]["encoder"] == records[1]["encoder"]
    assert shown["real"].shape == (2, 64, 64, 3) and shown["b"]["generated"].shape == (2, 64, 64, 3)


def test_latent_verdict_from_records():
    cost = [
        {"space": "latent", "flops": 1e9, "s_per_evaluation": 0.01, "status": "ok", "device": "d"},
        {"space": "pixel", "flops": 1e11, "status": "oom", "device": "d"},
    ]
    vae = [{"part": "decode", "flops": 1e9}]
    vaes = [
        {"reconstruction_psnr": 30.0, "prompt_accuracy": 0.8, "fid": 20.0},
        {"reconstruction_psnr": 31.0, "prompt_accuracy": 0.8, "fid": 19.0},
    ]
    overflow = [{"label": "fp16", "amplification": 1.0, "nan_images": 0, "psnr_vs_fp32": 70.0}]
    rows = tier1.latent_verdict(cost, vae, vaes, overflow, lab.PROFILES["gpu"])
    assert [r["verdict"] for r in rows] == ["holds", "not measured", "holds", "holds", "holds"]
    assert "did not fit" in rows[1]["measured"]


# --------------------------------------------------------------------------------------------------
# chapter 3: numerics
# --------------------------------------------------------------------------------------------------


def test_precision_speed_reports_unavailable_and_restores_tf32():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    records = tier1.precision_speed(
        "twin:tiny", ["fp32", "tf32", "bf16"], device="cpu", steps=1, size=32, batch_sizes=(1, 2),
        repeats=1, warmup=0,
    )  # fmt: skip
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    by = {(r["precision"], r.get("batch")): r for r in records}
    if not torch.cuda.is_available():
        assert by[("tf32", None)]["status"] == "unavailable" and "CUDA" in by[("tf32", None)]["reason"]
    assert by[("fp32", 2)]["status"] == "ok" and by[("bf16", 1)]["dtype"] == "bfloat16"
    assert "flops_per_image" not in by[("fp32", 1)]  # FLOPs are counted on a GPU only by default


def test_tf32_utilisation_is_against_a_fresh_peak():
    record = {"flops_per_image": 1e12, "s_per_image": 1.0, "utilisation": 123.0, "matmul_peak_tflops": 1e-3}
    tier1._against_tf32_peak(record, "cpu")
    assert record["matmul_peak_tflops"] > 1e-3
    assert record["utilisation"] == pytest.approx(1 / record["matmul_peak_tflops"])


def test_precision_quality_and_where_time_goes(tiny_shapes):
    records = tier1.precision_quality(str(tiny_shapes), ["fp32", "tf32", "bf16"], device="cpu", steps=1, n=2)
    by = {r["precision"]: r for r in records}
    assert by["fp32"]["psnr_vs_reference"] == 100.0
    assert by["bf16"]["status"] == "ok" and by["bf16"]["psnr_vs_reference"] < 100
    if not torch.cuda.is_available():
        assert by["tf32"]["status"] == "unavailable"
    breakdown = tier1.where_time_goes(
        "twin:tiny", ["fp32"], device="cpu", steps=1, size=32, batch_sizes=(1, 2)
    )
    assert [r["label"] for r in breakdown] == ["fp32, batch 1", "fp32, batch 2"]
    assert all(r["unet_s"] > 0 for r in breakdown)
    if not torch.cuda.is_available():
        assert breakdown[0]["busy_share"] is None


def test_numerics_verdict_from_records():
    P = lab.PROFILES["gpu"]

    def rec(precision, batch, seconds, memory):
        return {"precision": precision, "batch": batch, "s_per_image": seconds,
                "peak_allocated_gb": memory, "status": "ok", "device": "d"}  # fmt: skip

    speed = [rec("fp32", 1, 1.0, 6.0), rec("fp32", 16, 1.0, 20.0), rec("fp16", 1, 0.9, 3.0)]
    speed += [rec("fp16", 16, 0.5, 10.0), rec("bf16", 1, 0.9, 3.0), rec("bf16", 16, 0.5, 10.0)]
    scores = [
        {
            "precision": p,
            "prompt_accuracy": 0.8,
            "fid": 20.0,
            "psnr_vs_reference": psnr,
            "n": 256,
            "nan_images": 0,
        }
        for p, psnr in (("fp32", 100.0), ("fp16", 35.0), ("bf16", 30.0))
    ]
    rows = tier1.numerics_verdict(speed, scores, P)
    by = {r["claim"]: r["verdict"] for r in rows}
    assert by["FP16: 50% memory"] == "holds"
    assert by["FP16: 1.5-2x speed (batch 1)"] == "below the claim"
    assert by["FP16: 1.5-2x speed (batch 16)"] == "holds"
    assert by["FP16: negligible quality loss"] == "holds"
    assert all(r["verdict"] in VERDICTS for r in rows)


# --------------------------------------------------------------------------------------------------
# the tuned decoder
# --------------------------------------------------------------------------------------------------


def test_tune_decoder_keeps_the_encoder(tiny_shapes, tmp_path):
    info = tune_vae.tune_decoder(
        tiny_shapes, tmp_path / "vae", steps=2, batch_size=4, eval_n=4, progress=False
    )
    assert info["steps"] == 2 and info["psnr_before_db"] is not None and info["psnr_after_db"] is not None
    assert tune_vae.variant_info(tmp_path / "vae")["encoder_fingerprint"] == info["encoder_fingerprint"]
    base, tuned = tune_vae.load_vae(tiny_shapes / "vae"), tune_vae.load_vae(tmp_path / "vae")
    assert tune_vae.encoder_fingerprint(base) == tune_vae.encoder_fingerprint(tuned)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(base.decoder.parameters(), tuned.decoder.parameters(), strict=True)
    )
    assert changed
    assert tuned.config.scaling_factor == base.config.scaling_factor
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert tune_vae.variant_info(tmp_path / "nothing") is None


def test_swap_vae_takes_the_tuned_folder(tiny_shapes, tmp_path):
    import labkit

    tune_vae.tune_decoder(tiny_shapes, tmp_path / "vae", steps=1, batch_size=2, eval_n=0, progress=False)
    pipe = labkit.load_pipeline(str(tiny_shapes), device="cpu")
    (change,) = labkit.apply(pipe, [("swap_vae", {"vae": str(tmp_path / "vae")})])
    assert change.status == "applied"
    assert (
        tune_vae.encoder_fingerprint(pipe.vae)
        == tune_vae.variant_info(tmp_path / "vae")["encoder_fingerprint"]
    )


def test_shipped_variant_matches_the_shipped_model():
    """The tuned decoder must share the shipped model's encoder, or it decodes another latent space."""
    from labkit.shapes import MODEL_DIR

    if not (tune_vae.VARIANT_DIR / "config.json").exists() or not (MODEL_DIR / "vae").exists():
        pytest.skip("the shapes model or its tuned VAE is not shipped yet")
    shipped, tuned = tune_vae.load_vae(), tune_vae.load_vae(tune_vae.VARIANT_DIR)
    assert tune_vae.encoder_fingerprint(shipped) == tune_vae.encoder_fingerprint(tuned), (
        "labkit/shapes/variants/vae was tuned from another VAE: run `python -m labkit.shapes.tune_vae`"
    )
    assert tuned.config.scaling_factor == shipped.config.scaling_factor


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def test_tier1_plots_draw_from_records():
    import matplotlib.pyplot as plt

    rows = [{"sampler": s, "steps": n, "s_per_image": n * 0.1, "status": "ok"} for s in "AB" for n in (2, 4)]
    rows.append({"sampler": "C", "steps": 4, "s_per_image": None, "status": "oom"})
    fig = plots.lines(rows, "steps", "s_per_image", group="sampler", logx=True)
    assert len(fig.axes[0].lines) == 2
    fig = plots.image_rows(np.zeros((4, 8, 8, 3)), ["r1", "r2"], ["c1", "c2"], note="n")
    assert len(fig.axes) == 4
    cost = [
        {
            "label": "latent",
            "flops": 10.0,
            "flops_convolution": 6.0,
            "flops_attention": 1.0,
            "flops_linear": 3.0,
        },
        {
            "label": "pixel",
            "flops": 1e4,
            "flops_convolution": 400.0,
            "flops_attention": 9e3,
            "flops_linear": 200.0,
        },
    ]
    assert plots.flops_by_kind(cost).axes[0].get_yscale() == "log"
    breakdown = [
        {"label": "b1", "status": "ok", "batch": 1, "text_encoder_s": 0.1, "unet_s": 1.0, "attention_s": 0.3,
         "vae_decode_s": 0.2, "wall_s": 2.0, "busy_share": 0.6},
        {"label": "b2", "status": "ok", "batch": 2, "text_encoder_s": 0.1, "unet_s": 2.0, "attention_s": 0.5,
         "vae_decode_s": 0.4, "wall_s": 2.6, "busy_share": None},
    ]  # fmt: skip
    fig = plots.time_breakdown(breakdown)
    assert len(fig.axes[0].patches) == 10
    plt.close("all")
