"""The measurements of the three tier 1 chapters: samplers, latent diffusion and the VAE, numerics.

Each function is one experiment of a chapter and returns result records (plain dicts, saved with
`labkit.lab.save_records`), so tables, plots and verdicts are drawn from data:

- chapter 1 (samplers): :func:`use_sampler`, :func:`sampler_speed` (seconds per image on a twin),
  :func:`time_per_evaluation`, :func:`sampler_quality` (prompt accuracy and FID on ``shapes``),
  :func:`sampler_images`, :func:`steps_to_match`;
- chapter 2 (latent diffusion and the VAE): :func:`denoising_cost` (pixel-space against latent-space
  UNet: FLOPs and time), :func:`vae_cost`, :func:`generation_flops_ratio`, :func:`compare_vaes`,
  :func:`decoder_headroom`, :func:`amplified_decoder`, :func:`amplification_for`,
  :func:`overflow_demo`, :func:`reads_force_upcast`; the tuned decoder comes from
  :mod:`labkit.shapes.tune_vae`;
- chapter 3 (numerics): :func:`precision_speed`, :func:`precision_quality`, :func:`where_time_goes`.

Each chapter's verdict rows come from one function (:func:`samplers_verdict`, :func:`latent_verdict`,
:func:`numerics_verdict`), so that the verdicts are computed from the records with
`labkit.lab.judge`, never typed.

Helpers shared by the verdicts: :func:`find`, :func:`match_margin`, :func:`fewer_is_better`.
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from labkit import quality, tiers
from labkit.measure import benchmark, environment, image_check, release_memory, synchronize
from labkit.models import load_pipeline, quiet_diffusers, twin_config

# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def find(records: Sequence[dict], **match) -> dict | None:
    """The first record whose fields equal ``match`` (e.g. ``find(rows, sampler="DDIM", steps=50)``)."""
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def match_margin(p: float, n: int) -> float:
    """One standard error of a proportion ``p`` measured on ``n`` images: the accuracy noise floor.

    Two prompt accuracies closer than this are "the same quality" in the chapters' verdicts.
    """
    p = min(max(p, 1 / n), 1 - 1 / n)  # an accuracy of 0 or 1 on few images is still uncertain
    return math.sqrt(p * (1 - p) / n)


def fewer_is_better(verdict: str) -> str:
    """Reword a `labkit.lab.judge` verdict for a quantity where less is better (steps, seconds)."""
    return {
        "below the claim": "holds, and better: fewer than claimed",
        "above the claim": "does not hold: more than claimed",
    }.get(verdict, verdict)


def _timed_calls(fn: Callable[[], object], device, *, warmup: int, repeats: int) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (synchronised); peak memory."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {
        "seconds": statistics.median(times),
        "seconds_min": min(times),
        "seconds_max": max(times),
        "times_s": times,
        "peak_allocated_gb": peak,
    }


def _env(device) -> dict:
    return environment(torch.device(device))


# ---------------------------------------------------------------------------------------------------
# Chapter 1: samplers
# ---------------------------------------------------------------------------------------------------

SAMPLERS: dict[str, tuple[str, dict]] = {
    "DDPM": ("ddpm", {}),
    "PNDM": ("pndm", {}),
    "DDIM": ("ddim", {}),
    "Euler": ("euler", {}),
    "DPM++ 2M": ("dpm_solver", {}),
    "DPM++ 2M Karras": ("dpm_solver", {"karras": True}),
    "DPM++ 2M SDE": ("dpm_solver", {"sde": True}),
}
"""The samplers of the samplers chapter: display name -> (`labkit.tiers` optimization, its options)."""


def use_sampler(pipe, name: str, steps: int) -> tiers.Change:
    """Give ``pipe`` the sampler ``name`` (a key of :data:`SAMPLERS`) at ``steps`` steps.

    Every swap starts from the pipeline's *original* scheduler config, so options of an earlier
    swap (Karras sigmas, the SDE variant) never leak into the next sampler, and the pipeline's record
    of what was applied keeps only the current sampler. Used in the samplers chapter.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    if not hasattr(pipe, "labkit_original_scheduler"):
        pipe.labkit_original_scheduler = pipe.scheduler
    pipe.scheduler = pipe.labkit_original_scheduler
    sampler_names = {fn for fn, _ in SAMPLERS.values()}
    pipe.labkit_applied = [c for c in getattr(pipe, "labkit_applied", []) if c.name not in sampler_names]
    function, options = SAMPLERS[name]
    return tiers.OPTIMIZATIONS[function].fn(pipe, steps=steps, **options)


def sampler_speed(
    pipe,
    samplers: Sequence[tuple[str, int]],
    *,
    size: int,
    repeats: int,
    warmup: int,
    batch: int = 1,
) -> list[dict]:
    """Seconds per image (and peak memory) of each ``(sampler, steps)`` on ``pipe``: `labkit.benchmark`
    records with ``sampler`` added. FLOPs are not counted (the samplers chapter needs time only).
    Used in the samplers chapter, on a twin.
    """
    records = []
    for name, steps in samplers:
        use_sampler(pipe, name, steps)
        result = benchmark(
            pipe,
            steps=steps,
            size=size,
            batch=batch,
            repeats=repeats,
            warmup=warmup,
            label=f"{name} {steps}",
            flops=False,
        )
        result.record["sampler"] = name
        records.append(result.record)
        release_memory(pipe._execution_device)
    return records


def time_per_evaluation(records: Sequence[dict]) -> dict:
    """Fit ``seconds per image = fixed + per_evaluation x UNet evaluations`` over :func:`sampler_speed`
    records.

    ``fixed`` is what every generation pays once (text encoder, VAE decode), ``per_evaluation`` the
    cost of one denoising step; ``max_residual`` is the largest distance of a record from the line,
    as a share of its time. All samplers on one line means that a sampler is faster only by
    needing fewer steps. Used in the samplers chapter.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    x = np.array([r["denoiser_evaluations"] for r in ok], dtype=float)
    y = np.array([r["s_per_image"] for r in ok], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.abs(y - (intercept + slope * x)) / y
    return {
        "fixed_s": float(intercept),
        "per_evaluation_s": float(slope),
        "max_residual": float(residual.max()),
    }


def sampler_quality(pipe, samplers: Sequence[tuple[str, int]], *, n: int, seed: int = 0) -> list[dict]:
    """Prompt accuracy and FID of each ``(sampler, steps)`` on ``n`` held-out prompts of ``shapes``.

    Every configuration draws the same prompts with the same per-image seeds
    (:func:`labkit.quality.evaluate`), so the rows differ only by the sampler. Used in the samplers
    chapter.
    """
    records = []
    env = _env(pipe._execution_device)
    for name, steps in samplers:
        use_sampler(pipe, name, steps)
        scores = quality.evaluate(pipe, n=n, steps=steps, seed=seed)
        records.append(
            {
                "label": f"{name} {steps}",
                "sampler": name,
                "steps": steps,
                "source": getattr(pipe, "labkit_source", None),
                "status": "ok",
                "prompt_accuracy": scores["prompt_accuracy"],
                "accuracy": scores["accuracy"],
                "fid": scores["fid"],
                "n": n,
                "guidance": scores["guidance"],
                "seconds": scores["seconds"],
                "denoiser_evaluations": len(pipe.scheduler.timesteps),
                "scheduler": type(pipe.scheduler).__name__,
                **env,
            }
        )
    return records


def sampler_images(
    pipe, samplers: Sequence[tuple[str, int]], prompts: Sequence[str], *, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """One image per prompt for each ``(sampler, steps)``, same seeds: (rows x prompts) images, row labels.

    Image j of every row starts from the same noise (seed ``seed + j``). Used in the samplers chapter.
    """
    rows, labels = [], []
    for name, steps in samplers:
        use_sampler(pipe, name, steps)
        rows.append(quality.generate(pipe, list(prompts), steps=steps, seed=seed))
        labels.append(f"{name} {steps}")
    return np.concatenate(rows), labels


def steps_to_match(
    records: Sequence[dict],
    sampler: str,
    target: float,
    *,
    metric: str = "prompt_accuracy",
    margin: float = 0.0,
) -> int | None:
    """The fewest steps at which ``sampler`` reaches ``target`` on ``metric`` (within ``margin``).

    For ``prompt_accuracy`` (higher is better) a row matches when ``value >= target - margin``; for
    ``fid`` (lower is better) when ``value <= target + margin``. ``None`` when no row of the sweep
    matches. Used in the samplers chapter's verdict (the DPM-Solver++ paper's claim).
    """
    lower_is_better = metric == "fid"
    rows = sorted((r for r in records if r.get("sampler") == sampler), key=lambda r: r["steps"])
    for r in rows:
        value = r[metric]
        if (value <= target + margin) if lower_is_better else (value >= target - margin):
            return r["steps"]
    return None


def _f(value, spec: str = ".3g", unit: str = "") -> str:
    """Format a measured number for a verdict table ("n/a" when it could not be measured)."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def samplers_verdict(speed: Sequence[dict], scores: Sequence[dict], profile) -> list[dict]:
    """The rows of the samplers chapter's verdict, computed from its records with `labkit.lab.judge`.

    ``speed`` are :func:`sampler_speed` records on the twin (they must hold DDPM at
    ``profile.ddpm_steps``, DDIM and PNDM at ``profile.steps``, DPM++ 2M at ``profile.fast_steps``);
    ``scores`` are :func:`sampler_quality` records on ``shapes`` (DDIM and DPM++ 2M over a sweep of
    steps). Used in the samplers chapter.
    """
    from labkit.lab import judge

    P = profile
    ddpm = find(speed, sampler="DDPM", steps=P.ddpm_steps)
    ddim_t = find(speed, sampler="DDIM", steps=P.steps)
    dpm_t = find(speed, sampler="DPM++ 2M", steps=P.fast_steps)
    pndm_t = find(speed, sampler="PNDM", steps=P.steps)
    ddim_q = find(scores, sampler="DDIM", steps=P.steps)
    dpm_q = find(scores, sampler="DPM++ 2M", steps=P.fast_steps)
    best = max(scores, key=lambda r: r["prompt_accuracy"])
    n = ddim_q["n"]
    margin = match_margin(ddim_q["prompt_accuracy"], n)
    share = _ratio(ddim_q["prompt_accuracy"], best["prompt_accuracy"])
    gap = dpm_q["prompt_accuracy"] - ddim_q["prompt_accuracy"]
    fid_ratio = _ratio(dpm_q["fid"], ddim_q["fid"])
    dpm_vs_ddim = _ratio(ddim_t["s_per_image"], dpm_t["s_per_image"])
    ddim_vs_ddpm = _ratio(ddpm["s_per_image"], ddim_t["s_per_image"])
    dpm_vs_ddpm = _ratio(ddpm["s_per_image"], dpm_t["s_per_image"])
    dpm_vs_pndm = _ratio(pndm_t["s_per_image"], dpm_t["s_per_image"])
    match_acc = steps_to_match(scores, "DPM++ 2M", ddim_q["prompt_accuracy"], margin=margin)
    match_fid = steps_to_match(scores, "DPM++ 2M", ddim_q["fid"], metric="fid", margin=0.1 * ddim_q["fid"])
    largest = max(r["steps"] for r in scores if r["sampler"] == "DPM++ 2M")
    if ddpm.get("peak_allocated_gb") is None:
        saved, saved_text = None, f"not measurable on this device ({ddpm['device']})"
    else:
        saved = 1 - dpm_t["peak_allocated_gb"] / ddpm["peak_allocated_gb"]
        saved_text = f"{saved:.0%} (DPM++ {P.fast_steps} against DDPM {P.ddpm_steps})"
    if match_acc is None:
        paper = f"does not hold: not reached within {largest} steps"
    else:
        paper = fewer_is_better(judge(match_acc, 15, 20))
    return [
        {
            "claim": f"DDIM {P.steps}: good balance",
            "claimed": "near the best quality (>= 95% of the best prompt accuracy)",
            "measured": f"{_f(share, '.0%')} of the best ({best['label']}: {best['prompt_accuracy']:.3f}); "
            f"{_f(ddim_vs_ddpm)}x faster than DDPM {P.ddpm_steps}",
            "verdict": judge(share, 0.95, 1.0, tolerance=0),
        },
        {
            "claim": f"DPM-Solver++ {P.fast_steps}: faster than DDIM {P.steps}",
            "claimed": "faster",
            "measured": f"{_f(dpm_vs_ddim)}x faster",
            "verdict": judge(dpm_vs_ddim, 1.0, math.inf, tolerance=0),
        },
        {
            "claim": f"DPM-Solver++ {P.fast_steps}: similar quality to DDIM {P.steps}",
            "claimed": f"prompt accuracy within the noise (±{margin:.3f} on {n} images)",
            "measured": f"{gap:+.3f} prompt accuracy; FID x{_f(fid_ratio, '.2f')}",
            "verdict": judge(gap, -margin, margin, tolerance=0),
        },
        {
            "claim": f"10-20x speed-up, against DDPM at {P.ddpm_steps} steps",
            "claimed": "10-20x",
            "measured": f"DDIM {P.steps}: {_f(ddim_vs_ddpm)}x; DPM++ {P.fast_steps}: {_f(dpm_vs_ddpm)}x",
            "verdict": f"DDIM: {judge(ddim_vs_ddpm, 10, 20)}; DPM++: {judge(dpm_vs_ddpm, 10, 20)}",
        },
        {
            "claim": f"10-20x speed-up, against PNDM {P.steps} (SD 1.x's default)",
            "claimed": "10-20x",
            "measured": f"DPM++ {P.fast_steps}: {_f(dpm_vs_pndm)}x",
            "verdict": judge(dpm_vs_pndm, 10, 20),
        },
        {
            "claim": "30% memory reduction",
            "claimed": "30% less peak memory",
            "measured": saved_text,
            "verdict": judge(saved, 0.3),
        },
        {
            "claim": "DPM-Solver++ paper: DDIM's 50-step quality in 15-20 steps",
            "claimed": "15-20 steps",
            "measured": f"to match DDIM {P.steps}: {_f(match_acc)} steps (prompt accuracy), "
            f"{_f(match_fid)} steps (FID within 10%)",
            "verdict": paper,
        },
    ]


# ---------------------------------------------------------------------------------------------------
# Chapter 2: latent diffusion and the VAE
# ---------------------------------------------------------------------------------------------------

FLOP_KINDS = ("convolution", "attention", "linear", "other")
"""How `count_flops` groups aten ops: convolutions, attention (QK^T and AV), linear layers, the rest."""


def _flop_kind(op) -> str:
    name = str(op).removeprefix("aten.").split(".")[0]
    if name.startswith("convolution"):
        return "convolution"
    if name in ("bmm", "baddbmm") or name.startswith("_scaled_dot_product"):
        return "attention"
    if name in ("mm", "addmm", "linear"):
        return "linear"
    return "other"


def count_flops(fn: Callable[[], object]) -> dict:
    """FLOPs of ``fn()`` by kind (``flops``, ``flops_convolution``, ``flops_attention``, ...).

    Run it on the "meta" device to count without computing or allocating: the counter needs
    only the shapes. Used in the latent diffusion chapter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = {f"flops_{kind}": 0 for kind in FLOP_KINDS}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        counts[f"flops_{_flop_kind(op)}"] += flops
    return {"flops": counter.get_total_flops(), **counts}


def _unet_config(twin: str, space: str, size: int) -> tuple[dict, int, int]:
    """UNet config, input channels and input side of a twin's UNet in latent or pixel space."""
    config = twin_config(twin.removeprefix("twin:"))
    unet = dict(config["unet"])
    factor = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    if space == "latent":
        return unet, unet.get("in_channels", 4), size // factor
    if space == "pixel":
        unet |= {"in_channels": 3, "out_channels": 3, "sample_size": size}
        return unet, 3, size
    raise ValueError(f"space is 'latent' or 'pixel', not {space!r}")


def _unet_inputs(unet, batch: int, channels: int, side: int, device, dtype) -> dict:
    """Random inputs for one UNet evaluation (SDXL-style UNets also get their added conditions)."""
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, channels, side, side, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "encoder_hidden_states": torch.randn(
            batch, 77, config.cross_attention_dim, device=device, dtype=dtype
        ),
    }
    if config.addition_embed_type == "text_time":
        time_ids = 6 * config.addition_time_embed_dim
        text = config.projection_class_embeddings_input_dim - time_ids
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, 6, device=device, dtype=dtype),
        }
    return inputs


def denoising_cost(
    twin: str,
    size: int,
    *,
    device: str,
    dtype: torch.dtype | str,
    repeats: int,
    warmup: int,
    batch: int = 1,
    spaces: Sequence[str] = ("latent", "pixel"),
) -> list[dict]:
    """One UNet evaluation in latent space against the same UNet family in pixel space, for ``size`` px.

    The latent UNet is the twin's own (``size / 8`` px, 4 channels for SD); the pixel UNet is the
    same config with 3 input and output channels run on the ``size`` px image itself. FLOPs are
    counted on the "meta" device (no memory needed, even for a pixel UNet that would not fit); then
    each UNet is built on ``device`` with random weights and timed. A UNet that does not fit in
    memory gives a record with ``status="oom"``; ``repeats=0`` counts FLOPs only. Used in the latent
    diffusion chapter.
    """
    from diffusers import UNet2DConditionModel

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    env = _env(device)
    records = []
    for space in spaces:
        config, channels, side = _unet_config(twin, space, size)
        with torch.device("meta"):
            meta_unet = UNet2DConditionModel(**config)
            inputs = _unet_inputs(meta_unet, batch, channels, side, "meta", torch.float32)
            flops = count_flops(lambda u=meta_unet, i=inputs: u(**i))
        record = {
            "label": f"{space} space: {channels}x{side}x{side}",
            "space": space,
            "source": twin,
            "size": size,
            "input": [batch, channels, side, side],
            "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in meta_unet.parameters()),
            "status": "ok",
            **{k: v / batch for k, v in flops.items()},
            **env,
        }
        del meta_unet
        if repeats < 1:  # FLOPs only
            records.append(record)
            continue
        try:
            timing = time_unet(
                config, batch, channels, side, device=device, dtype=dtype, warmup=warmup, repeats=repeats
            )
            record |= {
                "s_per_evaluation": timing["seconds"] / batch,
                "s_min": timing["seconds_min"] / batch,
                "s_max": timing["seconds_max"] / batch,
                "times_s": timing["times_s"],
                "peak_allocated_gb": timing["peak_allocated_gb"],
            }
        except torch.OutOfMemoryError as error:
            record |= {"status": "oom", "error": str(error).splitlines()[0]}
        records.append(record)
    return records


def time_unet(
    config: dict,
    batch: int,
    channels: int,
    side: int,
    *,
    device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
) -> dict:
    """Time one evaluation of a random-weight ``UNet2DConditionModel(**config)`` built on ``device``
    (:func:`_timed_calls`'s dict; raises ``torch.OutOfMemoryError``, freeing the UNet first).
    Used by :func:`denoising_cost` and the distillation chapter's :func:`labkit.distill.unet_costs`.
    """
    from diffusers import UNet2DConditionModel

    unet = None
    try:
        torch.manual_seed(0)
        with torch.device(device), quiet_diffusers():
            unet = UNet2DConditionModel(**config).to(dtype).eval()
        inputs = _unet_inputs(unet, batch, channels, side, device, dtype)

        def evaluate(unet=unet, inputs=inputs):
            with torch.inference_mode():
                unet(**inputs)

        return _timed_calls(evaluate, device, warmup=warmup, repeats=repeats)
    finally:
        del unet
        release_memory(device)


def vae_cost(
    twin: str, size: int, *, device: str, dtype: torch.dtype | str, repeats: int, warmup: int
) -> list[dict]:
    """FLOPs (counted on "meta") and time of the twin's VAE encoding and decoding one ``size`` px image.

    Used in the latent diffusion chapter (what the latent model pays once per image).
    """
    from diffusers import AutoencoderKL

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config = twin_config(twin.removeprefix("twin:"))["vae"]
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    channels = config.get("latent_channels", 4)
    env = _env(device)
    shapes = {"encode": (1, 3, size, size), "decode": (1, channels, size // factor, size // factor)}

    def run(vae, part, x):
        with torch.inference_mode():
            return vae.encode(x).latent_dist.mode() if part == "encode" else vae.decode(x).sample

    records = []
    with torch.device("meta"):
        meta_vae = AutoencoderKL(**config)
        flops = {
            part: count_flops(lambda p=part, s=shape: run(meta_vae, p, torch.randn(s)))
            for part, shape in shapes.items()
        }
    vae = None
    try:
        torch.manual_seed(0)
        with torch.device(device), quiet_diffusers():
            vae = AutoencoderKL(**config).to(dtype).eval()
        for part, shape in shapes.items():
            x = torch.randn(shape, device=device, dtype=dtype)
            record = {
                "label": f"VAE {part}",
                "part": part,
                "source": twin,
                "size": size,
                "dtype": str(dtype).removeprefix("torch."),
                "status": "ok",
                **flops[part],
                **env,
            }
            try:
                timing = _timed_calls(
                    lambda v=vae, p=part, x=x: run(v, p, x), device, warmup=warmup, repeats=repeats
                )
                record |= {
                    "s_per_image": timing["seconds"],
                    "s_min": timing["seconds_min"],
                    "s_max": timing["seconds_max"],
                    "peak_allocated_gb": timing["peak_allocated_gb"],
                }
            except torch.OutOfMemoryError as error:
                record |= {"status": "oom", "error": str(error).splitlines()[0]}
                release_memory(device)
            records.append(record)
    finally:
        del vae
        release_memory(device)
    return records


def generation_flops_ratio(latent: dict, pixel: dict, decode: dict, steps: int, cfg: bool = True) -> float:
    """FLOPs of a whole pixel-space generation over a latent-space one (which also pays one VAE decode).

    ``latent`` and ``pixel`` are :func:`denoising_cost` records (per evaluation and image), ``decode``
    a :func:`vae_cost` record. With classifier-free guidance every step evaluates the UNet twice.
    Used in the latent diffusion chapter.
    """
    evaluations = steps * (2 if cfg else 1)
    return evaluations * pixel["flops"] / (evaluations * latent["flops"] + decode["flops"])


def decode(
    vae, latents: torch.Tensor, dtype: torch.dtype | None = None, *, scaled: bool = True
) -> np.ndarray:
    """Decode latents with ``vae``, in ``dtype`` (a cast copy of the VAE: ``vae`` itself is not changed).

    ``scaled`` latents are the UNet's (divided by ``scaling_factor`` first, as the pipeline does).
    Returns float NHWC images in [0, 1], NaN kept (so that `labkit.measure.image_check` sees it).
    Used in the latent diffusion chapter.
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


def shapes_latents(pipe, prompts: Sequence[str], *, steps: int, seed: int = 0) -> torch.Tensor:
    """The scaled latents ``pipe`` generates for ``prompts`` (``output_type="latent"``; seeds as in
    :func:`labkit.quality.generate`). Used in the latent diffusion chapter to decode one set of latents
    with several VAEs and precisions."""
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


def compare_vaes(
    pipe, vaes: dict, *, n: int, steps: int, seed: int = 0, show: int = 4
) -> tuple[list[dict], dict]:
    """Score each VAE of ``vaes`` (label -> ``AutoencoderKL``) as the last stage of ``pipe`` on ``shapes``.

    The latents are generated once, for ``n`` held-out prompts (:func:`shapes_latents`), and decoded
    by every VAE, so the rows differ only by the decoder. Each record has the reconstruction PSNR of
    ``n`` real held-out images (encode, decode), the prompt accuracy and FID of the decoded
    generations, and their PSNR against the first VAE's. Returns the records and, for display, the
    first ``show`` real images, reconstructions and generations. Used in the latent diffusion chapter.
    """
    from labkit.shapes import data as shapes_data
    from labkit.shapes.tune_vae import encoder_fingerprint, reconstruct

    held = shapes_data.heldout(n, seed=seed)
    latents = shapes_latents(pipe, held.prompts, steps=steps, seed=seed)
    env = _env(pipe._execution_device)
    records, shown = [], {"real": held.images[:show], "prompts": held.prompts[:show]}
    first = None
    for label, vae in vaes.items():
        images = decode(vae, latents)
        first = images if first is None else first
        recon = reconstruct(vae, held.images)
        scores = quality.attribute_accuracy(images, held.prompts)
        records.append(
            {
                "label": label,
                "source": getattr(pipe, "labkit_source", None),
                "status": "ok",
                "encoder": encoder_fingerprint(vae),
                "reconstruction_psnr": quality.psnr(held.images, recon),
                "prompt_accuracy": scores["all"],
                "fid": quality.fid(held.images, images),
                "psnr_vs_first": quality.psnr(first, images),
                "n": n,
                "steps": steps,
                "scheduler": type(pipe.scheduler).__name__,
                **env,
            }
        )
        shown[label] = {"reconstruction": recon[:show], "generated": images[:show]}
    return records, shown


def decoder_headroom(vae, latents: torch.Tensor) -> dict:
    """The largest activation anywhere in the decoder (fp32), and how far it is from fp16's limit.

    Hooks every module of ``post_quant_conv`` and the decoder and records the largest absolute
    output. ``headroom`` is ``65504 / peak``: below 1, fp16 overflows to inf (then NaN). Used in the
    latent diffusion chapter.
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
    fp16_max = float(torch.finfo(torch.float16).max)
    return {"peak_activation": peaks[where], "where": where, "headroom": fp16_max / peaks[where]}


def amplified_decoder(vae, factor: float):
    """A copy of ``vae`` whose decoder computes the same images with activations ``factor`` times larger.

    The decoder's residual stream is scaled up where it is written (``conv_in``, the last convolution
    of every resnet branch, every attention output, the biases of the shortcuts and upsampling
    convolutions); the group norms that read it are scale-invariant, so in exact arithmetic the
    output does not change. Stable Diffusion's VAE is like that by training: fine in fp32, with
    activations beyond fp16's range. (``sdxl-vae-fp16-fix`` did the reverse: scaled them down.)
    Used in the latent diffusion chapter.
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
    """The :func:`amplified_decoder` factor that brings the decoder's largest activation to ``peak``.

    Activations grow in proportion to the factor, so one trial amplification measures the slope.
    Used in the latent diffusion chapter (``peak=2 * 65504``: twice past fp16's limit).
    """
    measured = decoder_headroom(amplified_decoder(vae, trial), latents)["peak_activation"]
    return trial * peak / measured


def overflow_demo(vae, latents: torch.Tensor, factors: Sequence[float]) -> tuple[list[dict], np.ndarray]:
    """Decode ``latents`` in fp32, fp16, bf16 and "fp16, upcast", with ``vae`` and amplified copies of it.

    For each factor of ``factors`` the decoder is :func:`amplified_decoder` (1: ``vae`` itself): the same
    function, activations that much larger. Once they pass fp16's limit (65504) they become inf, then
    NaN, and the image is lost, while fp32 still gives the original picture. "fp16, upcast" is the guard
    diffusers' SDXL pipelines apply when ``vae.config.force_upcast`` is set: fp16 latents, an fp32
    decoder. Returns one record per (factor, precision) with the decoder's peak activation (fp32),
    ``nan_images`` and ``black_images`` (`labkit.measure.image_check`) and the PSNR against ``vae``'s
    fp32 decode, and the images (records x N x H x W x 3). Used in the latent diffusion chapter.
    """
    modes = [
        ("fp32", torch.float32, torch.float32),
        ("fp16", torch.float16, torch.float16),
        ("bf16", torch.bfloat16, torch.bfloat16),
        ("fp16, upcast", torch.float16, torch.float32),  # fp16 latents, fp32 decoder
    ]
    reference = decode(vae, latents, torch.float32)
    records, images = [], []
    for factor in factors:
        model = vae if factor == 1 else amplified_decoder(vae, factor)
        peak = decoder_headroom(model, latents)["peak_activation"]
        for label, latent_dtype, vae_dtype in modes:
            decoded = decode(model, latents.to(latent_dtype), vae_dtype)
            check = image_check(decoded)
            records.append(
                {
                    "label": label,
                    "amplification": factor,
                    "peak_activation": peak,
                    "status": "nan" if check["nan_images"] else "ok",
                    **check,
                    "psnr_vs_fp32": None if check["nan_images"] else quality.psnr(reference, decoded),
                }
            )
            images.append(decoded)
    return records, np.stack(images)


def reads_force_upcast(pipeline_class) -> bool:
    """Whether a diffusers pipeline class's code reads ``vae.config.force_upcast`` (looked up in its source).

    Used in the latent diffusion chapter: SDXL pipelines do, Stable Diffusion 1.x/2.x's do not.
    """
    return "force_upcast" in inspect.getsource(pipeline_class)


def latent_verdict(
    cost: Sequence[dict],
    vae: Sequence[dict],
    vaes: Sequence[dict],
    overflow: Sequence[dict],
    profile,
) -> list[dict]:
    """The rows of the latent diffusion chapter's verdict, computed from its records with `labkit.lab.judge`.

    ``cost``: :func:`denoising_cost` records (latent, pixel); ``vae``: :func:`vae_cost` records;
    ``vaes``: :func:`compare_vaes` records (the shipped VAE first, the tuned one second);
    ``overflow``: :func:`overflow_demo` records (amplification 1 included). Used in the latent
    diffusion chapter.
    """
    from labkit.lab import judge

    latent, pixel = find(cost, space="latent"), find(cost, space="pixel")
    decoder = find(vae, part="decode")
    flops_ratio = pixel["flops"] / latent["flops"]
    generation = generation_flops_ratio(latent, pixel, decoder, profile.fast_steps)
    if pixel["status"] == "oom":
        time_ratio, time_text = None, f"the pixel-space UNet did not fit in memory ({pixel['device']})"
    elif "s_per_evaluation" not in pixel:
        time_ratio, time_text = None, "not timed"
    else:
        time_ratio = pixel["s_per_evaluation"] / latent["s_per_evaluation"]
        seconds = (pixel["s_per_evaluation"], latent["s_per_evaluation"])
        time_text = f"{time_ratio:.3g}x ({seconds[0]:.3g} s against {seconds[1]:.3g} s)"
    shipped, tuned = vaes[0], vaes[1]
    gain = tuned["reconstruction_psnr"] - shipped["reconstruction_psnr"]
    native = [r for r in overflow if r["amplification"] == 1]
    fp16 = find(native, label="fp16")
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
            "claim": f"latent diffusion: {claim} (whole generation, {profile.fast_steps} steps with "
            "guidance, VAE decode included)",
            "claimed": "50-200x",
            "measured": f"{generation:.3g}x",
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


# ---------------------------------------------------------------------------------------------------
# Chapter 3: numerics
# ---------------------------------------------------------------------------------------------------

PRECISIONS: dict[str, list[str]] = {"fp32": [], "tf32": ["tf32"], "fp16": ["fp16"], "bf16": ["bf16"]}
"""The numeric formats of the numerics chapter: name -> `labkit.tiers` optimizations to apply."""


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_flags(flags: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _with_precision(source: str, precision: str, *, device: str, sampler: str, steps: int):
    """A fresh pipeline of ``source`` with ``sampler`` and ``precision``; raises `labkit.Unavailable`."""
    pipe = load_pipeline(source, device=device)
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, sampler, steps)
    for name in PRECISIONS[precision]:
        tiers.OPTIMIZATIONS[name].fn(pipe)
    return pipe


def _unavailable(label: str, precision: str, reason: str, device) -> dict:
    return {"label": label, "precision": precision, "status": "unavailable", "reason": reason, **_env(device)}


def _against_tf32_peak(record: dict, device) -> None:
    """Recompute a TF32 record's utilisation against the TF32 matmul peak (`labkit.measure` caches the
    fp32 peak per dtype, measured without TF32)."""
    from labkit import measure

    peak = measure.matmul_peak_tflops(device, torch.float32)  # the TF32 peak: TF32 is on now
    record["matmul_peak_tflops"] = peak
    record["utilisation"] = record["flops_per_image"] / record["s_per_image"] / (peak * 1e12)


def precision_speed(
    source: str,
    precisions: Sequence[str],
    *,
    device: str,
    steps: int,
    size: int,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
    sampler: str = "DPM++ 2M",
    flops: bool | None = None,
) -> list[dict]:
    """`labkit.benchmark` records of each precision at each batch size, on a fresh pipeline each.

    ``flops`` (FLOPs per image and utilisation of the matmul peak) defaults to on for a CUDA device
    only: on a CPU, measuring the fp16 matmul peak alone takes many seconds and means little.

    TF32 is a process-wide switch: it is set for its own runs and the previous flags are restored
    after. A precision that cannot run here (TF32 without a CUDA GPU) gives one record with
    ``status="unavailable"`` and the reason. Each record gets ``precision`` and the TF32 flags in force
    (``tf32_matmul``, ``tf32_cudnn``: PyTorch's default lets cuDNN convolutions use TF32 even in
    "fp32"). Used in the numerics chapter.
    """
    records = []
    for precision in precisions:
        flags = _tf32_flags()
        pipe = None
        try:
            pipe = _with_precision(source, precision, device=device, sampler=sampler, steps=steps)
            for batch in batch_sizes:
                result = benchmark(
                    pipe,
                    steps=steps,
                    size=size,
                    batch=batch,
                    repeats=repeats,
                    warmup=warmup,
                    label=f"{precision}, batch {batch}",
                    flops=torch.device(device).type == "cuda" if flops is None else flops,
                )
                tf32_matmul, tf32_cudnn = _tf32_flags()
                if precision == "tf32" and "utilisation" in result.record:
                    _against_tf32_peak(result.record, device)
                result.record |= {
                    "precision": precision,
                    "sampler": sampler,
                    "tf32_matmul": tf32_matmul if torch.device(device).type == "cuda" else None,
                    "tf32_cudnn": tf32_cudnn if torch.device(device).type == "cuda" else None,
                }
                records.append(result.record)
                release_memory(device)
        except tiers.Unavailable as reason:
            records.append(_unavailable(precision, precision, str(reason), device))
        finally:
            _set_tf32_flags(flags)
            del pipe
            release_memory(device)
    return records


def precision_quality(
    source: str,
    precisions: Sequence[str],
    *,
    device: str,
    steps: int,
    n: int,
    seed: int = 0,
    sampler: str = "DPM++ 2M",
) -> list[dict]:
    """Prompt accuracy, FID and same-seed PSNR against the first precision (fp32) on ``shapes``.

    Every precision draws the same ``n`` held-out prompts from the same seeds, so the PSNR says how
    much the picture itself changes. NaN images are counted (``nan_images``). A precision that cannot
    run here gives a record with ``status="unavailable"``. Used in the numerics chapter.
    """
    records, reference = [], None
    for precision in precisions:
        flags = _tf32_flags()
        pipe = None
        try:
            pipe = _with_precision(source, precision, device=device, sampler=sampler, steps=steps)
            scores = quality.evaluate(pipe, n=n, steps=steps, seed=seed, return_images=True)
            images = scores.pop("images")
            if reference is None:
                reference = images
            check = image_check(images)
            records.append(
                {
                    "label": precision,
                    "precision": precision,
                    "source": source,
                    "sampler": sampler,
                    "steps": steps,
                    "status": "nan" if check["nan_images"] else "ok",
                    "prompt_accuracy": scores["prompt_accuracy"],
                    "fid": scores["fid"],
                    "psnr_vs_reference": quality.psnr(reference, np.nan_to_num(images)),
                    "n": n,
                    "seconds": scores["seconds"],
                    **check,
                    **_env(device),
                }
            )
        except tiers.Unavailable as reason:
            records.append(_unavailable(precision, precision, str(reason), device))
        finally:
            _set_tf32_flags(flags)
            del pipe
            release_memory(device)
    return records


def where_time_goes(
    source: str,
    precisions: Sequence[str],
    *,
    device: str,
    steps: int,
    size: int,
    batch_sizes: Sequence[int],
    sampler: str = "DPM++ 2M",
) -> list[dict]:
    """`labkit.profiling.time_breakdown` of each precision at each batch size: seconds per region
    (text encoder, UNet, attention, VAE decode) and, on a GPU, ``busy_share``, the share of the wall
    time at least one kernel runs. Low busy share = launch-bound (the GPU waits for the CPU); near 1 =
    compute-bound. Used in the numerics chapter.
    """
    from labkit.profiling import time_breakdown

    records = []
    for precision in precisions:
        flags = _tf32_flags()
        pipe = None
        try:
            pipe = _with_precision(source, precision, device=device, sampler=sampler, steps=steps)
            for batch in batch_sizes:
                breakdown = time_breakdown(pipe, steps=steps, size=size, batch=batch)
                records.append(
                    {
                        "label": f"{precision}, batch {batch}",
                        "precision": precision,
                        "batch": batch,
                        "steps": steps,
                        "size": size,
                        "source": source,
                        "status": "ok",
                        **breakdown,
                        "s_per_image": breakdown["wall_s"] / batch,
                        **_env(device),
                    }
                )
                release_memory(device)
        except tiers.Unavailable as reason:
            records.append(_unavailable(precision, precision, str(reason), device))
        finally:
            _set_tf32_flags(flags)
            del pipe
            release_memory(device)
    return records


def numerics_verdict(speed: Sequence[dict], scores: Sequence[dict], profile) -> list[dict]:
    """The rows of the numerics chapter's verdict, computed from its records with `labkit.lab.judge`.

    ``speed``: :func:`precision_speed` records (fp32, fp16 and bf16 at the profile's batch sizes);
    ``scores``: :func:`precision_quality` records on ``shapes`` (fp32 first). Used in the numerics
    chapter.
    """
    from labkit.lab import judge

    batches = (min(profile.batch_sizes), max(profile.batch_sizes))
    fp32 = {b: find(speed, precision="fp32", batch=b, status="ok") for b in batches}
    reference = find(scores, precision="fp32")
    margin = match_margin(reference["prompt_accuracy"], reference["n"])
    rows = []
    for name in ("fp16", "bf16"):
        half = {b: find(speed, precision=name, batch=b, status="ok") for b in batches}
        speedup = {b: _ratio(fp32[b]["s_per_image"], half[b]["s_per_image"]) for b in batches}
        memory = {
            b: _ratio(half[b].get("peak_allocated_gb"), fp32[b].get("peak_allocated_gb")) for b in batches
        }
        q = find(scores, precision=name)
        gap = q["prompt_accuracy"] - reference["prompt_accuracy"]
        claim = "FP16" if name == "fp16" else "bf16 instead of FP16 (not in the guide)"
        if memory[batches[0]] is None:
            memory_text = f"not measurable on this device ({fp32[batches[0]]['device']})"
        else:
            memory_text = ", ".join(f"{memory[b]:.0%} of fp32 at batch {b}" for b in batches)
        rows += [
            {
                "claim": f"{claim}: 50% memory",
                "claimed": "50% of fp32's peak memory",
                "measured": memory_text,
                "verdict": judge(memory[batches[0]], 0.5),
            },
            *(
                {
                    "claim": f"{claim}: 1.5-2x speed (batch {b})",
                    "claimed": "1.5-2x",
                    "measured": f"{_f(speedup[b])}x ({_f(fp32[b]['s_per_image'])} s -> "
                    f"{_f(half[b]['s_per_image'])} s per image)",
                    "verdict": judge(speedup[b], 1.5, 2.0),
                }
                for b in dict.fromkeys(batches)
            ),
            {
                "claim": f"{claim}: negligible quality loss",
                "claimed": f"prompt accuracy within the noise (±{margin:.3f} on {q['n']} images)",
                "measured": f"{gap:+.3f} prompt accuracy; FID {reference['fid']:.1f} -> {q['fid']:.1f}; "
                f"same-seed PSNR {q['psnr_vs_reference']:.1f} dB; {q['nan_images']} NaN images",
                "verdict": "does not hold (NaN images)"
                if q["nan_images"]
                else judge(gap, -margin, margin, tolerance=0),
            },
        ]
    return rows
