"""Samplers (tier 1): the scheduler and its step count, and the one table of the lab's samplers.

Every swap starts from the scheduler the model was trained with (``pipe.labkit_scheduler_config``,
kept by `labkit.load_pipeline`), so options of an earlier swap (Karras sigmas, the SDE variant) never
leak into the next, and a new sampler replaces the previous one in the pipeline's record.
"""

from __future__ import annotations

import warnings

from labkit.optimizations.registry import SAMPLER, Change, optimization, set_call


def _swap_scheduler(pipe, class_name: str, steps: int, **overrides) -> str:
    import diffusers

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, not {steps!r}")
    trained = getattr(pipe, "labkit_scheduler_config", None) or dict(pipe.scheduler.config)
    before = trained.get("_class_name") or type(pipe.scheduler).__name__
    pipe.scheduler = getattr(diffusers, class_name).from_config(trained, **overrides)
    set_call(pipe, steps=steps)
    return f"scheduler {before} (as trained) -> {class_name}, {steps} steps"


@optimization(tier=1, stage=SAMPLER)
def pndm(pipe, steps: int = 50) -> str:
    """PNDM (PLMS) at 50 steps: Stable Diffusion 1.x's default sampler, the baseline's."""
    return _swap_scheduler(pipe, "PNDMScheduler", steps, skip_prk_steps=True)


@optimization(tier=1, stage=SAMPLER)
def ddim(pipe, steps: int = 50) -> str:
    """DDIM at 50 steps, the guide's 'good balance'."""
    return _swap_scheduler(pipe, "DDIMScheduler", steps)


@optimization(tier=1, stage=SAMPLER)
def dpm_solver(pipe, steps: int = 20, karras: bool = False, sde: bool = False) -> str:
    """DPM-Solver++ (2M) at 20 steps, the guide's fast sampler; optionally Karras sigmas or the SDE variant."""
    algorithm = "sde-dpmsolver++" if sde else "dpmsolver++"
    return _swap_scheduler(
        pipe, "DPMSolverMultistepScheduler", steps, algorithm_type=algorithm, use_karras_sigmas=karras
    )


@optimization(tier=1, stage=SAMPLER)
def euler(pipe, steps: int = 30) -> str:
    """Euler (Karras et al.'s discrete Euler sampler), SDXL's default, at 30 steps."""
    return _swap_scheduler(pipe, "EulerDiscreteScheduler", steps)


@optimization(tier=1, stage=SAMPLER)
def ddpm(pipe, steps: int = 1000) -> str:
    """DDPM, ancestral sampling over all training steps: the slow reference sampler."""
    return _swap_scheduler(pipe, "DDPMScheduler", steps)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@optimization(tier=3, stage=SAMPLER)
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
    ``"squaredcos_cap_v2"``. A schedule or prediction type the model was not trained with gives a
    warning, and the change says so: expect ruined images.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, not {beta_schedule!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    trained = dict(getattr(pipe, "labkit_scheduler_config", None) or pipe.scheduler.config)
    trained.setdefault("prediction_type", "epsilon")
    trained["rescale_betas_zero_snr"] = bool(trained.get("rescale_betas_zero_snr", False))
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


SAMPLERS: dict[str, tuple[str, dict]] = {
    "DDPM": ("ddpm", {}),
    "PNDM": ("pndm", {}),
    "DDIM": ("ddim", {}),
    "Euler": ("euler", {}),
    "DPM++ 2M": ("dpm_solver", {}),
    "DPM++ 2M Karras": ("dpm_solver", {"karras": True}),
    "DPM++ 2M SDE": ("dpm_solver", {"sde": True}),
}
"""The lab's samplers, the one table: display name -> (optimization, its options)."""


def sampler_step(name: str, steps: int) -> tuple[str, dict]:
    """The optimization step (name, options) of sampler ``name`` (a key of `SAMPLERS`) at ``steps``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    function, options = SAMPLERS[name]
    return function, {"steps": steps, **options}


def use_sampler(pipe, name: str, steps: int) -> Change:
    """Give ``pipe`` the sampler ``name`` (a key of `SAMPLERS`) at ``steps`` steps, replacing the last one."""
    function, options = sampler_step(name, steps)
    return _FUNCTIONS[function](pipe, **options)


_FUNCTIONS = {fn.__name__: fn for fn in (ddpm, pndm, ddim, euler, dpm_solver)}
