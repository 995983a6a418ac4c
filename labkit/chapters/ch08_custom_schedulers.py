"""Chapter 8, custom schedulers: the guide's snippet as written, a scheduler that does not match the training,
and the ``shapes:vpred`` variant (v-prediction, cosine betas, zero terminal SNR) against the epsilon model.

- `GUIDE_SNIPPETS` and `try_snippets`: the guide's lines run in the installed diffusers (what raises,
  what each builds);
- `SCHEDULES`, `alphas_cumprod`, `schedule_table` and `plot_log_snr`: the noise schedules and their
  signal-to-noise ratio (arithmetic on a scheduler config, not a measurement);
- `trained` and `ddim_options`: what a ``shapes`` source was trained with, and the DDIM (trailing
  spacing) that keeps it; `use_ddim` gives a pipeline that DDIM (through ``custom_scheduler``);
- `mismatch_scenarios`: the epsilon model under the schedulers of `MISMATCHES` (``quality`` scenarios);
- `sweep_scenarios`: both models at each step count, each with its own right DDIM (``quality``);
- `side_by_side` and `mismatch_images`: the same prompts and seeds through each, for the eye;
- `training_steps`: how long a ``shapes`` source was trained;
- `verdict_rows`: the chapter's verdict, computed from the records.

The variant is trained with ``labkit train vpred`` and shipped with ``labkit train ship`` (`labkit.training`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from labkit.book import Profile, judge, match_margin
from labkit.models import generate
from labkit.optimizations import apply
from labkit.quality import DEFAULT_GUIDANCE
from labkit.scenarios import Scenario
from labkit.shapes import MODEL_DIR, VARIANTS_DIR

# ---------------------------------------------------------------------------------------------------
# 1. The guide's snippets, as written
# ---------------------------------------------------------------------------------------------------

GUIDE_SNIPPETS = (
    'DDIMScheduler(beta_schedule="cosine", prediction_type="v_prediction")',
    'DDIMScheduler(beta_schedule="cosine")',
)
"""The guide's custom-scheduler snippet (tier 3) and its decision-matrix variant, verbatim."""


def _describe(scheduler) -> str:
    c = scheduler.config
    return (
        f"builds {type(scheduler).__name__}: beta_schedule={c.beta_schedule!r}, "
        f"prediction_type={c.prediction_type!r}, clip_sample={c.clip_sample}, "
        f"timestep_spacing={c.timestep_spacing!r}"
    )


def try_snippets(model_dir: str | Path) -> list[dict]:
    """Run the guide's scheduler snippets (and their fixes) in this diffusers; what each one does.

    Returns ``{"snippet", "outcome", "ok"}`` rows; an exception is caught and shown, never raised.
    ``model_dir`` stands in for the guide's ``model_id`` (a local folder, so it runs offline).
    """
    from diffusers import DDIMScheduler  # diffusers is a heavy import: only where it is used

    model_id = str(model_dir)
    tries: list[tuple[str, Callable[[], object]]] = [
        (
            'DDIMScheduler.from_pretrained(model_id, subfolder="scheduler")',
            lambda: DDIMScheduler.from_pretrained(model_id, subfolder="scheduler"),
        ),
        (
            GUIDE_SNIPPETS[0],
            lambda: DDIMScheduler(beta_schedule="cosine", prediction_type="v_prediction"),
        ),
        (GUIDE_SNIPPETS[1], lambda: DDIMScheduler(beta_schedule="cosine")),
        (
            'DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")',
            lambda: DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        ),
        (
            'DDIMScheduler.from_pretrained(model_id, subfolder="scheduler",\n'
            '    beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")',
            lambda: DDIMScheduler.from_pretrained(
                model_id,
                subfolder="scheduler",
                beta_schedule="squaredcos_cap_v2",
                prediction_type="v_prediction",
            ),
        ),
    ]
    rows = []
    for snippet, build in tries:
        try:
            outcome, ok = _describe(build()), True
        except Exception as error:  # the point is to show what raises
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            outcome, ok = f"raises {type(error).__name__}: {message}", False
        rows.append({"snippet": snippet, "outcome": outcome, "ok": ok})
    return rows


# ---------------------------------------------------------------------------------------------------
# 2. The noise schedules
# ---------------------------------------------------------------------------------------------------

SCHEDULES = {
    "scaled_linear (SD 1.x, the shipped shapes model)": ("scaled_linear", False),
    "squaredcos_cap_v2 (cosine)": ("squaredcos_cap_v2", False),
    "squaredcos_cap_v2 + zero terminal SNR (the vpred variant)": ("squaredcos_cap_v2", True),
}
"""The schedules of the chapter: label -> (beta_schedule, rescale_betas_zero_snr)."""


def alphas_cumprod(beta_schedule: str, rescale: bool = False) -> np.ndarray:
    """``alpha_bar_t`` for t = 0..999 of SD's 1000-step schedule (betas 0.00085-0.012 where linear)."""
    from diffusers import DDPMScheduler  # diffusers is a heavy import: only where it is used

    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        rescale_betas_zero_snr=rescale,
    )
    return scheduler.alphas_cumprod.double().numpy()


def schedule_table(at: Sequence[int] = (0, 250, 500, 750, 900, 999)) -> list[dict]:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` of each schedule at a few timesteps.

    The last column is the *terminal* SNR: above zero, the model never trains on pure noise, yet
    sampling starts from pure noise (Lin et al., 2024).
    """
    rows = []
    for label, (schedule, rescale) in SCHEDULES.items():
        a = alphas_cumprod(schedule, rescale)
        row = {"schedule": label}
        for t in at:
            row[f"SNR at t={t}"] = float(a[t] / (1 - a[t]))
        rows.append(row)
    return rows


def plot_log_snr(ax=None):
    """log10 SNR against the timestep for each schedule of `SCHEDULES`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, (schedule, rescale) in SCHEDULES.items():
        a = alphas_cumprod(schedule, rescale)
        with np.errstate(divide="ignore"):
            ax.plot(np.log10(a / (1 - a)), label=label)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("log10 SNR")
    ax.set_title("noise schedules (zero terminal SNR: -inf at t=999)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


# ---------------------------------------------------------------------------------------------------
# 3. Schedulers on a model: what it was trained with, and DDIM with trailing spacing
# ---------------------------------------------------------------------------------------------------

SAMPLER = "DDIM trailing"
"""The sampler of every quality row: DDIM with trailing timestep spacing (through ``custom_scheduler``)."""

TRAINED_KEYS = ("beta_schedule", "prediction_type", "rescale_betas_zero_snr")
"""The scheduler settings fixed by training (in the order ``custom_scheduler`` names them)."""


def _settings(config: Mapping) -> dict:
    """The settings of `TRAINED_KEYS` in a scheduler config (diffusers' defaults where it has none)."""
    return {
        "beta_schedule": config.get("beta_schedule"),
        "prediction_type": config.get("prediction_type", "epsilon"),
        "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
    }


def trained(source: str) -> dict:
    """The noise schedule and prediction type a ``shapes`` source (``"shapes"``, ``"shapes:vpred"``) was
    trained with, from its scheduler config (a variant without one uses the shipped model's)."""
    path = Path(MODEL_DIR) / "scheduler" / "scheduler_config.json"
    if source.startswith("shapes:"):
        own = Path(VARIANTS_DIR) / source.removeprefix("shapes:") / "scheduler" / "scheduler_config.json"
        path = own if own.exists() else path
    elif source != "shapes":
        raise ValueError(f"trained() reads the shapes model or a variant ('shapes:vpred'), not {source!r}")
    return _settings(json.loads(path.read_text()))


def ddim_options(settings: Mapping, **overrides) -> dict:
    """``custom_scheduler`` options: DDIM with trailing spacing and the trained ``settings`` (see
    `trained`), with ``overrides`` (``prediction_type=...``) changing some of them."""
    return {**{k: settings[k] for k in TRAINED_KEYS}, "timestep_spacing": "trailing"} | overrides


def mismatch_warning(settings: Mapping, options: Mapping) -> str | None:
    """The warning ``custom_scheduler`` gives for ``options`` on a model trained with ``settings``."""
    mismatched = [f"{k}={settings[k]!r}" for k in TRAINED_KEYS if options[k] != settings[k]]
    if not mismatched:
        return None
    return f"the model was trained with {', '.join(mismatched)}: expect ruined images"


def use_ddim(pipe, steps: int, **overrides) -> str:
    """Give ``pipe`` DDIM with trailing spacing at ``steps`` steps (``custom_scheduler``), keeping what the
    model was trained with unless ``overrides`` change it; returns what changed, with the warning if any.
    ``use_ddim(pipe, 20)`` is the *right* DDIM for either model."""
    options = ddim_options(_settings(pipe.labkit_scheduler_config), **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is in the returned text instead
        (change,) = apply(pipe, [("custom_scheduler", {**options, "steps": steps})])
    return change.what


def _quality(source: str, options: dict, steps: int, P: Profile, label: str, notes: dict) -> Scenario:
    return Scenario(
        kind="quality",
        source=source,
        optimizations=(("custom_scheduler", {**options, "steps": steps}),),
        steps=steps,
        n=P.quality_images,
        label=label,
        notes={"sampler": SAMPLER, **notes},
    )


MISMATCHES: dict[str, dict] = {
    "as trained: epsilon, scaled_linear": dict(prediction_type="epsilon", beta_schedule="scaled_linear"),
    "prediction_type=v_prediction": dict(prediction_type="v_prediction", beta_schedule="scaled_linear"),
    "beta_schedule=squaredcos_cap_v2": dict(prediction_type="epsilon", beta_schedule="squaredcos_cap_v2"),
    "both (the guide's snippet, fixed)": dict(
        prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"
    ),
    "both + zero-SNR rescale": dict(
        prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True
    ),
}
"""Scheduler settings tried on the epsilon-trained model: label -> overrides of its trained settings."""


def mismatch_scenarios(P: Profile, configs: Mapping[str, dict] | None = None) -> list[Scenario]:
    """Quality of ``P.model`` under each scheduler of ``configs`` (default `MISMATCHES`), DDIM trailing at
    ``P.steps``: the same held-out prompts and seeds, only the scheduler's settings differ.

    Each record notes what the model was trained with (``trained``), what the scheduler was told
    (``scheduler_config``) and ``custom_scheduler``'s ``warning`` (None when they match).
    """
    settings = trained(P.model)
    out = []
    for label, overrides in (configs or MISMATCHES).items():
        options = ddim_options(settings, **overrides)
        notes = {
            "trained": settings,
            "scheduler_config": {k: options[k] for k in TRAINED_KEYS},
            "warning": mismatch_warning(settings, options),
        }
        out.append(_quality(P.model, options, P.steps, P, label, notes))
    return out


def models(P: Profile) -> dict[str, str]:
    """The two models compared: label -> source (the epsilon model and its v-prediction variant)."""
    return {
        f"epsilon ({P.model})": P.model,
        f"v-pred + cosine + zero SNR ({P.model}:vpred)": f"{P.model}:vpred",
    }


def sweep_scenarios(P: Profile, steps: Sequence[int] | None = None) -> list[Scenario]:
    """Quality of each of `models` at each step count (default ``P.sampler_steps``), each with its *own*
    right DDIM: trailing spacing (which the zero-terminal-SNR paper requires, so that sampling starts at
    t=999), keeping each model's trained prediction type, betas and rescale."""
    out = []
    for name, source in models(P).items():
        settings = trained(source)
        for s in steps or P.sampler_steps:
            notes = {"model": name, "trained": settings}
            out.append(_quality(source, ddim_options(settings), s, P, f"{name} {s}", notes))
    return out


def side_by_side(
    pipes: Mapping[str, object], steps: Sequence[int], prompts: Sequence[str], *, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """One image per prompt for each (model, steps), each model with its own right DDIM, same seeds:
    (rows x prompts) images and row labels. For the eye: nothing here is a measurement."""
    rows, labels = [], []
    for label, pipe in pipes.items():
        for s in steps:
            use_ddim(pipe, s)
            rows.append(generate(pipe, list(prompts), steps=s, guidance=DEFAULT_GUIDANCE, seed=seed))
            labels.append(f"{label} {s}")
    return np.concatenate(rows), labels


def mismatch_images(
    pipe, prompts: Sequence[str], *, steps: int, configs: Mapping[str, dict] | None = None, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """The same prompts and seeds under each scheduler of ``configs`` (default `MISMATCHES`), for the eye."""
    rows, labels = [], []
    for label, overrides in (configs or MISMATCHES).items():
        use_ddim(pipe, steps, **overrides)
        rows.append(generate(pipe, list(prompts), steps=steps, guidance=DEFAULT_GUIDANCE, seed=seed))
        labels.append(label)
    return np.concatenate(rows), labels


def training_steps(source: str) -> int | None:
    """How many UNet steps the shapes model or variant ``source`` was trained (``labkit_shapes.json``)."""
    folder = MODEL_DIR if source == "shapes" else VARIANTS_DIR / source.removeprefix("shapes:")
    info = folder / "labkit_shapes.json"
    return json.loads(info.read_text()).get("unet_steps") if info.exists() else None


# ---------------------------------------------------------------------------------------------------
# 4. The verdict
# ---------------------------------------------------------------------------------------------------


def _compare(diffs: Sequence[tuple[int, float]], margin: float) -> str:
    """Verdict for "better at the same step count" from (steps, improvement) pairs and a noise margin."""
    better = [s for s, d in diffs if d > margin]
    worse = [s for s, d in diffs if d < -margin]
    if better and not worse:
        return "holds" if len(better) == len(diffs) else f"holds at {better} steps, same elsewhere"
    if worse and not better:
        return f"does not hold: worse at {worse} steps"
    if better and worse:
        return f"mixed: better at {better}, worse at {worse} steps"
    return "not shown: within the noise at every step count"


def verdict_rows(sweep: Sequence[dict], mismatches: Sequence[dict], *, new: str, old: str) -> list[dict]:
    """The rows of the chapter's verdict, computed from its records.

    ``sweep`` are records of `sweep_scenarios` holding models ``new`` (the v-prediction variant) and
    ``old`` (the epsilon model) at the same step counts; ``mismatches`` are records of
    `mismatch_scenarios`, the first row being the scheduler the epsilon model was trained with.
    """
    by = {(r["model"], r["steps"]): r for r in sweep if r.get("status") == "ok"}
    steps = sorted({s for m, s in by if m == new} & {s for m, s in by if m == old})
    acc, fid, parts_acc, parts_fid = [], [], [], []
    for s in steps:
        a, b = by[(new, s)], by[(old, s)]
        acc.append((s, a["prompt_accuracy"] - b["prompt_accuracy"]))
        parts_acc.append(f"{s}: {b['prompt_accuracy']:.3f} -> {a['prompt_accuracy']:.3f}")
        fid.append((s, (b["fid"] - a["fid"]) / b["fid"] if b["fid"] else 0.0))
        parts_fid.append(f"{s}: {b['fid']:.1f} -> {a['fid']:.1f}")
    n = min((r["n"] for r in sweep), default=0)
    worst_p = max((by[(old, s)]["prompt_accuracy"] for s in steps), default=0.5)
    margin = match_margin(min(worst_p, 0.5) if n else 0.5, max(n, 1))
    rows = [
        {
            "claim": "better quality at same step count: prompt accuracy",
            "claimed": f"v-pred + cosine + zero SNR above epsilon (beyond ±{margin:.3f}, n={n})",
            "measured": "; ".join(parts_acc) or "not measured",
            "verdict": _compare(acc, margin) if steps else "not measured",
        },
        {
            "claim": "better quality at same step count: FID",
            "claimed": "v-pred + cosine + zero SNR lower (beyond 10%)",
            "measured": "; ".join(parts_fid) or "not measured",
            "verdict": _compare(fid, 0.10) if steps else "not measured",
        },
    ]
    base = mismatches[0] if mismatches else None
    if base is None or base.get("status") != "ok":
        rows.append(
            {
                "claim": "needs a model trained that way",
                "claimed": "a scheduler that does not match the training ruins the images",
                "measured": "not measured",
                "verdict": "not measured",
            }
        )
    else:
        m = match_margin(base["prompt_accuracy"], base["n"])
        drops = {
            r["label"]: base["prompt_accuracy"] - (r.get("prompt_accuracy") or 0.0) for r in mismatches[1:]
        }
        ruined = [k for k, d in drops.items() if d > m]
        rows.append(
            {
                "claim": "needs a model trained that way",
                "claimed": "a scheduler that does not match the training ruins the images",
                "measured": f"epsilon model, as trained {base['prompt_accuracy']:.3f}; "
                + "; ".join(
                    f"{r['label']}: {r.get('prompt_accuracy', float('nan')):.3f}" for r in mismatches[1:]
                ),
                "verdict": "holds"
                if len(ruined) == len(drops)
                else f"holds for {len(ruined)} of {len(drops)} mismatches (beyond ±{m:.3f})",
            }
        )
    top = max(steps, default=None)
    if top is None:
        speed, ratio = "not measured", None
    else:
        a, b = by[(new, top)], by[(old, top)]
        ratio = b["seconds"] / a["seconds"] if a["seconds"] else None
        same = a["unet_parameters"] == b["unet_parameters"]
        speed = (
            f"UNet parameters {a['unet_parameters']:,} vs {b['unet_parameters']:,}; "
            f"{top} steps x {n} images: {b['seconds']:.2f} s vs {a['seconds']:.2f} s "
            f"({ratio:.2f}x) on {a.get('device', '?')}; one timed run each, so within timing noise"
        )
        if not same:
            ratio = None
    rows.append(
        {
            "claim": "speed: unchanged (same architecture, same steps)",
            "claimed": "1x",
            "measured": speed,
            # one timed run per model, no repeats: allow the noise of a single timing (about 25% on a busy CPU)
            "verdict": judge(ratio, 1.0, tolerance=0.25),
        }
    )
    return rows
