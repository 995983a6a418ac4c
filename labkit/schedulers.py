"""Custom schedulers (chapter 8): the guide's snippet as written, what a scheduler that does not match the
training does to a model, and a `shapes` variant trained with v-prediction on cosine betas with zero
terminal SNR, compared with the epsilon model at equal step counts.

The variant ships as ``labkit/shapes/variants/vpred/`` (its UNet in fp16 and its scheduler config) and
loads as ``labkit.load_pipeline("shapes:vpred")``. Train and ship it again with::

    labkit train-shapes --preset cpu --threads 1 --stages unet --vae-from labkit/shapes/model \\
        --prediction-type v_prediction --beta-schedule squaredcos_cap_v2 --rescale-zero-snr \\
        --unet-steps 5030 --out runs/vpred
    python -m labkit.schedulers ship runs/vpred/model

and measure it against the epsilon model with ``python -m labkit.schedulers compare --n 500``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import quality
from .tier1 import match_margin

# ---------------------------------------------------------------------------------------------------
# 1. The guide's snippets, as written
# ---------------------------------------------------------------------------------------------------

#: the guide's custom-scheduler snippet (tier 3) and its decision-matrix variant, verbatim
GUIDE_SNIPPETS = (
    'DDIMScheduler(beta_schedule="cosine", prediction_type="v_prediction")',
    'DDIMScheduler(beta_schedule="cosine")',
)


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
    Used in the custom-schedulers chapter.
    """
    from diffusers import DDIMScheduler

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

#: the schedules of this chapter: (beta_schedule, rescale_betas_zero_snr)
SCHEDULES = {
    "scaled_linear (SD 1.x, the shipped shapes model)": ("scaled_linear", False),
    "squaredcos_cap_v2 (cosine)": ("squaredcos_cap_v2", False),
    "squaredcos_cap_v2 + zero terminal SNR (the vpred variant)": ("squaredcos_cap_v2", True),
}


def alphas_cumprod(beta_schedule: str, rescale: bool = False) -> np.ndarray:
    """``alpha_bar_t`` for t = 0..999 of SD's 1000-step schedule (betas 0.00085-0.012 where linear)."""
    from diffusers import DDPMScheduler

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
    sampling starts from pure noise (Lin et al., 2024). Used in the custom-schedulers chapter.
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
    """log10 SNR against the timestep for each schedule of :data:`SCHEDULES` (chapter 8)."""
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
# 3. Schedulers on a model, and their quality
# ---------------------------------------------------------------------------------------------------

#: scheduler settings tried on the epsilon-trained model: label -> custom_scheduler options
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


def use_ddim(pipe, steps: int, **overrides) -> str:
    """DDIM with trailing timestep spacing, through `labkit.tiers.custom_scheduler`.

    Unset options keep what the model was trained with (``pipe.labkit_trained``), so ``use_ddim(pipe, 20)``
    is the *right* DDIM for either model. Returns what changed, with the mismatch warning if any.
    """
    from . import tiers

    trained = dict(getattr(pipe, "labkit_trained", None) or {})
    options = {
        "beta_schedule": trained.get("beta_schedule") or "scaled_linear",
        "prediction_type": trained.get("prediction_type") or "epsilon",
        "rescale_betas_zero_snr": bool(trained.get("rescale_betas_zero_snr", False)),
        "timestep_spacing": "trailing",
    } | overrides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is returned in the text instead
        return tiers.custom_scheduler(pipe, steps=steps, **options).what


def _score(pipe, *, n: int, steps: int, seed: int) -> dict:
    """`labkit.quality.evaluate` that turns a broken generation (NaN images) into a status."""
    try:
        scores = quality.evaluate(pipe, n=n, steps=steps, seed=seed)
    except Exception as error:  # a schedule that divides by zero: recorded, not raised
        return {"status": "error", "reason": f"{type(error).__name__}: {error}"}
    bad = not math.isfinite(scores["fid"])
    return {
        "status": "nan" if bad else "ok",
        "prompt_accuracy": scores["prompt_accuracy"],
        "accuracy": scores["accuracy"],
        "fid": scores["fid"] if not bad else None,
        "guidance": scores["guidance"],
        "seconds": scores["seconds"],
    }


def _env(pipe) -> dict:
    from .tier1 import _env as env

    return env(pipe._execution_device)


def mismatch_sweep(
    pipe, *, steps: int, n: int, configs: Mapping[str, dict] | None = None, seed: int = 0
) -> list[dict]:
    """Quality of ``pipe`` under each scheduler of ``configs`` (default :data:`MISMATCHES`), DDIM trailing.

    Every row uses the same held-out prompts and seeds; only the scheduler's settings differ. Used in
    the custom-schedulers chapter to show that a scheduler must match the training.
    """
    records = []
    for label, options in (configs or MISMATCHES).items():
        what = use_ddim(pipe, steps, **options)
        records.append(
            {
                "label": label,
                "source": getattr(pipe, "labkit_source", None),
                "sampler": "DDIM trailing",
                "steps": steps,
                "n": n,
                "trained": dict(getattr(pipe, "labkit_trained", {})),
                "scheduler_config": {
                    k: pipe.scheduler.config.get(k)
                    for k in ("prediction_type", "beta_schedule", "rescale_betas_zero_snr")
                },
                "warning": what.split("WARNING: ")[1] if "WARNING: " in what else None,
                **_score(pipe, n=n, steps=steps, seed=seed),
                **_env(pipe),
            }
        )
    return records


def step_sweep(models: Mapping[str, object], steps: Sequence[int], *, n: int, seed: int = 0) -> list[dict]:
    """Quality of each model (label -> pipeline) at each step count, each with its *own* right DDIM.

    DDIM with trailing spacing (which the zero-terminal-SNR paper requires, so that sampling starts at
    t=999), keeping each model's trained prediction type, betas and rescale. Same prompts and seeds for
    every row. Used in the custom-schedulers chapter.
    """
    records = []
    for label, pipe in models.items():
        for s in steps:
            use_ddim(pipe, s)
            records.append(
                {
                    "label": f"{label} {s}",
                    "model": label,
                    "source": getattr(pipe, "labkit_source", None),
                    "sampler": "DDIM trailing",
                    "steps": s,
                    "n": n,
                    "trained": dict(getattr(pipe, "labkit_trained", {})),
                    "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                    **_score(pipe, n=n, steps=s, seed=seed),
                    **_env(pipe),
                }
            )
    return records


def side_by_side(
    models: Mapping[str, object], steps: Sequence[int], prompts: Sequence[str], *, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """One image per prompt for each (model, steps), same seeds: (rows x prompts) images and row labels."""
    rows, labels = [], []
    for label, pipe in models.items():
        for s in steps:
            use_ddim(pipe, s)
            rows.append(quality.generate(pipe, list(prompts), steps=s, seed=seed))
            labels.append(f"{label} {s}")
    return np.concatenate(rows), labels


def mismatch_images(
    pipe, prompts: Sequence[str], *, steps: int, configs: Mapping[str, dict] | None = None, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """The same prompts and seeds under each scheduler of ``configs`` (default :data:`MISMATCHES`)."""
    rows, labels = [], []
    for label, options in (configs or MISMATCHES).items():
        use_ddim(pipe, steps, **options)
        rows.append(quality.generate(pipe, list(prompts), steps=steps, seed=seed))
        labels.append(label)
    return np.concatenate(rows), labels


def training_steps(source: str) -> int | None:
    """How many UNet steps the shapes model or variant ``source`` was trained (``labkit_shapes.json``)."""
    from .shapes import MODEL_DIR, VARIANTS_DIR

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


def verdict_rows(
    sweep: Sequence[dict],
    mismatches: Sequence[dict],
    *,
    new: str,
    old: str,
) -> list[dict]:
    """The rows of the custom-schedulers chapter's verdict, computed from its records.

    ``sweep`` are :func:`step_sweep` records holding models ``new`` (the v-prediction variant) and
    ``old`` (the epsilon model) at the same step counts; ``mismatches`` are :func:`mismatch_sweep`
    records of the epsilon model, the first row being the scheduler it was trained with.
    """
    from .lab import judge

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


# ---------------------------------------------------------------------------------------------------
# 5. Shipping the variant
# ---------------------------------------------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out |= load_file(f)
    return out


def same_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two saved components (folders of safetensors) hold identical tensors."""
    x, y = _tensors(Path(a)), _tensors(Path(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def ship_variant(
    model_dir: str | Path,
    name: str = "vpred",
    *,
    reference: str | Path | None = None,
    dest: str | Path | None = None,
) -> Path:
    """Copy a trained shapes pipeline's UNet (fp16 safetensors) and scheduler into ``variants/NAME/``.

    The variant reuses the shipped model's text encoder and VAE, so those must be identical to
    ``reference`` (the shipped model); otherwise this raises. The scheduler is DDIM with trailing
    spacing and the training's prediction type, betas and zero-SNR rescale. Returns the folder.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from .shapes import MODEL_DIR, VARIANTS_DIR

    model_dir, reference = Path(model_dir), Path(reference or MODEL_DIR)
    if not (model_dir / "unet" / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a trained shapes pipeline folder (no unet/config.json)")
    for part in ("text_encoder", "vae"):
        if not same_weights(model_dir / part, reference / part):
            raise ValueError(
                f"the {part} of {model_dir} differs from {reference}'s: a variant ships only its UNet, "
                "so train it with --vae-from and the frozen text encoder (the default)"
            )
    dest = Path(dest) if dest else Path(VARIANTS_DIR) / name
    if dest.exists():
        shutil.rmtree(dest)
    unet = UNet2DConditionModel.from_pretrained(
        model_dir / "unet", use_safetensors=True, torch_dtype=torch.float16
    )
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    trained = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    known = set(inspect.signature(DDIMScheduler.__init__).parameters)
    config = {k: v for k, v in trained.items() if k in known}  # drop PNDM-only keys
    rescale = bool(trained.get("rescale_betas_zero_snr", False))
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", rescale_betas_zero_snr=rescale)
    scheduler.save_pretrained(dest / "scheduler")
    shutil.copy2(model_dir / "labkit_shapes.json", dest / "labkit_shapes.json")
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.schedulers ship FOLDER`` or ``compare`` (the README's numbers)."""
    p = argparse.ArgumentParser(prog="python -m labkit.schedulers", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ship", help="copy a trained variant's UNet + scheduler into labkit/shapes/variants")
    s.add_argument("model", help="the trained pipeline folder, e.g. runs/vpred/model")
    s.add_argument("--name", default="vpred")
    c = sub.add_parser("compare", help="quality at equal DDIM (trailing) steps, two sources")
    c.add_argument("--sources", default="shapes,shapes:vpred")
    c.add_argument("--steps", default="5,10,20,50")
    c.add_argument("--n", type=int, default=500)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--json", default=None, help="also append the rows here (JSON lines)")
    m = sub.add_parser("mismatch", help="a model under schedulers it was not trained with (DDIM trailing)")
    m.add_argument("--source", default="shapes")
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--n", type=int, default=100)
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--json", default=None, help="also append the rows here (JSON lines)")
    args = p.parse_args(argv)
    if args.command == "mismatch":
        return _mismatch_main(args)
    if args.command == "ship":
        print(ship_variant(args.model, args.name))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from .models import load_pipeline

    models = {}
    for source in args.sources.split(","):
        models[source] = load_pipeline(source, device="cpu")
        models[source].set_progress_bar_config(disable=True)
    for source, pipe in models.items():
        for steps in [int(x) for x in args.steps.split(",")]:
            (row,) = step_sweep({source: pipe}, [steps], n=args.n)
            row["training_steps"] = training_steps(source)
            acc = row.get("accuracy", {})
            print(
                f"{source:>14} DDIM trailing {steps:>3} steps  prompt accuracy "
                f"{row.get('prompt_accuracy', float('nan')):.3f}  (shape {acc.get('shape', 0):.3f} "
                f"color {acc.get('color', 0):.3f} position {acc.get('position', 0):.3f} "
                f"size {acc.get('size', 0):.3f})  FID {row.get('fid') or float('nan'):.2f}  "
                f"[{row.get('seconds', 0):.0f} s]",
                flush=True,
            )
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


def _mismatch_main(args: argparse.Namespace) -> int:
    from .models import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.source, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for row in mismatch_sweep(pipe, steps=args.steps, n=args.n):
        print(
            f"{args.source} DDIM trailing {args.steps} steps, {row['label']:>36}: prompt accuracy "
            f"{row.get('prompt_accuracy', float('nan')):.3f}  FID {row.get('fid') or float('nan'):.1f}  "
            f"({row['status']})",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
