"""The v-prediction variant of the shapes model: train its UNet, ship it (``labkit train vpred``).

A UNet trained with v-prediction on cosine betas with zero terminal SNR, on the shipped model's VAE and
frozen text encoder, so that the variant ships only its UNet (fp16) and its scheduler, in
``labkit/shapes/variants/vpred/``, and loads as ``labkit.load_pipeline("shapes:vpred")``; the custom
schedulers chapter (8) compares it with the epsilon model. It is the UNet stage of
`labkit.training.shapes` with these defaults (``--prediction-type v_prediction --beta-schedule
squaredcos_cap_v2 --rescale-zero-snr --vae-from shapes``); ``--export`` ships the result::

    # the shipped variant: CPU, 1 thread, the shipped model's 5030 UNet steps
    labkit train vpred --preset cpu --threads 1 --steps 5030 --minutes 66 --eval-n 0 --out runs/vpred \\
        --export labkit/shapes/variants/vpred

    # one GPU (an H100)
    labkit train vpred --preset gpu --device cuda --out runs/vpred-gpu --export labkit/shapes/variants/vpred

    # ship a pipeline trained before (no training)
    labkit train vpred --ship-from runs/vpred/model --export labkit/shapes/variants/vpred

Shipping checks that the trained pipeline's text encoder and VAE are those of the ``--vae-from``
pipeline (the shipped model), since the variant reuses them, and writes a ``DDIMScheduler`` with
trailing spacing and the training's prediction type, betas and zero-SNR rescale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from labkit.training import shapes
from labkit.training.jobs import Trainer, config_from_args, pipeline_folder, run_job

VPRED = dict(
    out="runs/vpred",
    prediction_type="v_prediction",
    beta_schedule="squaredcos_cap_v2",
    rescale_zero_snr=True,
    vae_from="shapes",
)
"""What makes the variant: the shapes trainer's settings that change."""

PRESETS: dict[str, dict] = {name: {**preset, **VPRED} for name, preset in shapes.PRESETS.items()}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out |= load_file(f)
    return out


def same_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two saved components (folders of safetensors) hold identical tensors."""
    x, y = _tensors(Path(a)), _tensors(Path(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def ship_variant(model_dir: str | Path, dest: str | Path, reference: str | Path = "shapes") -> Path:
    """Write a trained shapes pipeline's UNet (fp16 safetensors) and scheduler into the variant folder ``dest``.

    The variant reuses the text encoder and VAE of ``reference`` (``"shapes"``: the shipped model), so
    those must be identical in ``model_dir``; otherwise this raises ``ValueError``. The scheduler is DDIM
    with trailing spacing and the training's prediction type, betas and zero-SNR rescale. Only
    ``unet/``, ``scheduler/`` and ``labkit_shapes.json`` of ``dest`` are replaced. Returns ``dest``.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    model_dir, reference, dest = Path(model_dir), pipeline_folder(reference), Path(dest)
    if not (model_dir / "unet" / "config.json").exists():
        raise ValueError(f"{model_dir} is not a trained shapes pipeline folder (no unet/config.json)")
    for part in ("text_encoder", "vae"):
        if not same_weights(model_dir / part, reference / part):
            raise ValueError(
                f"the {part} of {model_dir} differs from {reference}'s: a variant ships only its UNet, "
                "so train it with --vae-from and the frozen text encoder (the default)"
            )
    for part in ("unet", "scheduler"):
        shutil.rmtree(dest / part, ignore_errors=True)
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


def train(cfg: shapes.ShapesConfig, export: str | None = None) -> dict:
    """Train the variant's UNet on the ``vae_from`` pipeline's VAE; ship it to ``export`` if given."""
    if not cfg.vae_from:
        raise ValueError("the variant reuses a trained VAE: give --vae-from shapes (or a pipeline folder)")
    return shapes.train(
        cfg, ("unet",), export=export,
        exporter=lambda model, dest: ship_variant(model, dest, reference=cfg.vae_from),
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shapes.add_arguments(
        parser,
        PRESETS,
        export="ship the variant here (its UNet, its scheduler), e.g. labkit/shapes/variants/vpred",
    )
    parser.add_argument("--ship-from", default=None, metavar="DIR",
                        help="no training: ship this trained pipeline folder to --export")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(shapes.ShapesConfig, PRESETS, args)
    if args.ship_from:
        if not args.export:
            raise ValueError(
                "--ship-from needs --export (the variant folder, e.g. labkit/shapes/variants/vpred)"
            )
        print(ship_variant(args.ship_from, args.export, reference=cfg.vae_from or "shapes"))
        return 0
    return run_job(args, cfg.out, lambda: train(cfg, export=args.export))


TRAINER = Trainer(
    help="the v-prediction variant (cosine betas, zero terminal SNR): train its UNet, ship it",
    add_arguments=add_arguments,
    run=run,
)
