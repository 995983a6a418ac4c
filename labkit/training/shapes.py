"""Train the shapes model: the VAE first, then the UNet (``labkit train shapes``).

::

    # CPU (the shipped model): 12 + 28 minutes (time budgets) on a busy 2-core machine
    labkit train shapes --preset cpu --threads 1 --out runs/shapes --export labkit/shapes/model

    # one GPU (an H100): at most 10 minutes
    labkit train shapes --preset gpu --device cuda --out runs/shapes-gpu --export labkit/shapes/model

The classifier behind `labkit.quality` is ``labkit train classifier`` (`labkit.training.classifier`); the
v-prediction variant is ``labkit train vpred`` (`labkit.training.vpred`), this trainer's UNet stage with
other defaults.

How it trains:

1. **Data**: a bank of procedurally drawn training images (``--bank-size``, uint8, on the device) so that
   the device never waits for numpy; its prompts are tokenized once (there are only 270).
2. **VAE** (``AutoencoderKL``, f=4): MSE reconstruction, weighted 11x on the shape's pixels (a small
   shape is 2% of the image; unweighted, its colour drifts), plus a tiny KL term (weight 1e-6, as in SD's
   VAE, so the latents stay close to deterministic); the learning rate decays (cosine) to 10%.
   Afterwards the bank is encoded once and ``scaling_factor`` is set to 1 / std of the latents (SD 1.5's
   0.18215 was found the same way).
3. **UNet**, with the text encoder **frozen at its random initialisation** (``--train-text-encoder`` trains
   it jointly instead). Trained jointly, the encoder learnt to shout the colour (a colour word changed every
   later token's output by 13, at a norm of 8) and to all but erase the position words (0.3, and 0.03 on
   later tokens): the UNet, which learns colour first, gave no reason to keep them, and after 2000 steps
   "top left" and "bottom right" produced the same UNet output to 3 decimals. A frozen random encoder
   keeps every word distinct; the UNet's cross-attention projections learn to read what they need. (It
   also means the 271 prompt encodings are computed once.) The noise, the timesteps and the
   ``--prediction-type`` / ``--beta-schedule`` / ``--rescale-zero-snr`` choices are those of diffusers'
   ``DDPMScheduler``; the loss uses min-SNR-5 weighting (Hang et al., 2023), which converges faster at
   equal steps; 10% of prompts are dropped to "" for classifier-free guidance; an EMA of the weights is
   what gets exported.

Checkpoints (``OUT/checkpoints/*.safetensors`` + ``.json``: weights, optimizer, EMA, step, elapsed time) are
written every ``--checkpoint-minutes`` and on Ctrl-C or SIGTERM, and every UNet checkpoint also exports the
pipeline to ``OUT/model``. Running the same command again resumes where it stopped; a stage that reached
its step count or its time budget is skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.models import load_pipeline
from labkit.training.jobs import (
    EMA,
    DenoisingBatches,
    DiffusionConfig,
    Loop,
    Trainer,
    add_config_arguments,
    add_job_arguments,
    autocast,
    config_from_args,
    copy_folder,
    encode_bank,
    encode_prompts,
    load_checkpoint,
    load_vae,
    make_bank,
    noise_scheduler,
    optimizer_step,
    per_example_mse,
    pick_device,
    quick_eval,
    run_job,
    set_lr,
    snr_weight,
    to_float,
    tokenize_prompts,
    warmup,
    write_summary,
)

STAGES = ("vae", "unet")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "squaredcos_cap_v2", "linear")


def _model_config(sizes):
    """The `labkit.shapes.build.ModelConfig` named ``sizes`` ("default" or "tiny"), or ``sizes`` itself."""
    # labkit.shapes.build imports diffusers: loaded when a job runs, not when `labkit` parses its arguments
    from labkit.shapes.build import ModelConfig

    if isinstance(sizes, ModelConfig):
        return sizes
    if sizes == "default":
        return ModelConfig()
    if sizes == "tiny":
        return ModelConfig.tiny()
    raise ValueError(f"model sizes {sizes!r}: 'default' (the shipped model) or 'tiny' (tests)")


@dataclass
class ShapesConfig(DiffusionConfig):
    """Everything a shapes training run depends on; ``steps``, ``minutes``, ``batch_size``, ``lr`` are the
    UNet stage's. ``PRESETS`` holds the shipped recipes."""

    out: str = "runs/shapes"
    steps: int = 8000
    minutes: float = 28.0
    # the sizes: a ModelConfig, or "default" (the shipped model's) / "tiny" (tests); set by presets only
    model: object = field(default="default", metadata={"flag": False})
    # VAE stage
    vae_steps: int = 1200
    vae_minutes: float = 12.0
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    foreground_weight: float = 10.0
    # UNet stage
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    rescale_zero_snr: bool = False
    snr_floor: float = 0.0
    high_noise: float = 0.0
    ema_decay: float = 0.999
    train_text_encoder: bool = False
    # the UNet stage on this pipeline's VAE (and its scaling_factor) instead of OUT's: "shapes" or a folder
    vae_from: str | None = None

    def __post_init__(self):
        self.model = _model_config(self.model)


PRESETS: dict[str, dict] = {
    # the shipped CPU model: at most 12 + 28 minutes on 2 (shared) cores
    "cpu": {},
    # one data-centre GPU, at most 10 minutes in all (bf16 autocast)
    "gpu": dict(
        bank_size=60_000,
        vae_steps=3000,
        vae_minutes=1.5,
        vae_batch_size=128,
        vae_lr=2e-3,
        steps=30_000,
        minutes=6.5,
        batch_size=256,
        lr=1e-3,
        warmup_steps=300,
        ema_decay=0.9995,
        eval_n=500,
    ),
    # seconds, for tests and CI: a model of a few thousand parameters
    "tiny": dict(
        model="tiny",
        bank_size=64,
        vae_steps=3,
        vae_batch_size=8,
        steps=4,
        batch_size=8,
        warmup_steps=1,
        eval_n=0,
        log_every=1,
    ),
}

HELP = {
    "out": "work folder: checkpoints/, model/ (the pipeline), logs",
    "steps": "UNet training steps",
    "minutes": "time budget of the UNet stage",
    "batch_size": "UNet batch size",
    "lr": "UNet (+ text encoder) learning rate",
    "vae_steps": "VAE training steps",
    "vae_minutes": "time budget of the VAE stage",
    "vae_batch_size": "VAE batch size",
    "vae_lr": "VAE learning rate (cosine decay to 10%)",
    "kl_weight": "VAE: weight of the KL term",
    "foreground_weight": "VAE: extra MSE weight on the shape's pixels",
    "prediction_type": "what the UNet predicts",
    "beta_schedule": "noise schedule",
    "rescale_zero_snr": "zero terminal SNR betas",
    "snr_floor": "loss weights: clip the SNR below (0: off)",
    "high_noise": "share of timesteps drawn from the noisiest 30%",
    "ema_decay": "EMA of the exported weights",
    "train_text_encoder": "train the text encoder with the UNet",
    "vae_from": "skip the VAE stage: the VAE of this pipeline ('shapes': the shipped model, or a folder)",
}
CHOICES = {"prediction_type": PREDICTION_TYPES, "beta_schedule": BETA_SCHEDULES}


# ----------------------------------------------------------------------------------------------------------
# the VAE stage


def _foreground_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weight: ``1 + weight`` on the shape, 1 on the background (the image's median colour).

    A small shape covers about 2% of the pixels, so with a plain MSE its colour and outline barely count;
    weighting them keeps small green triangles green and triangular.
    """
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    foreground = ((x - background).abs().sum(1, keepdim=True) > 0.2).float()
    return 1.0 + weight * foreground


def train_vae(cfg: ShapesConfig, bank: torch.Tensor, device: torch.device) -> torch.nn.Module:
    """Stage 1: the ``AutoencoderKL`` on the image bank; resumes from ``OUT/checkpoints/vae.safetensors``."""
    from labkit.shapes.build import build_vae

    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.model).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def train_step(step: int) -> dict:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(bank), (cfg.vae_batch_size,), generator=g).to(device)
        x = to_float(bank[idx])
        set_lr(opt, cfg.vae_lr * (0.55 + 0.45 * math.cos(math.pi * step / cfg.vae_steps)))  # cosine to 10%
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        squared = (recon.float() - x).pow(2)
        loss = (_foreground_weight(x, cfg.foreground_weight) * squared).mean()
        loss = loss + cfg.kl_weight * posterior.kl().mean()
        optimizer_step(opt, loss, vae.parameters())
        return {"mse": squared.mean()}

    vae.train()
    loop = Loop("vae", cfg, {"vae": vae}, opt, device, steps=cfg.vae_steps, minutes=cfg.vae_minutes)
    loop.run(train_step)
    return vae.eval()


# ----------------------------------------------------------------------------------------------------------
# the UNet stage


def train_unet(
    cfg: ShapesConfig, vae, tokenizer, bank: torch.Tensor, bank_prompts: torch.Tensor, device: torch.device
) -> None:
    """Stage 2: the UNet (and the text encoder, if trained) on latents of the bank; exports to ``OUT/model``."""
    from labkit.shapes.build import build_text_encoder, build_unet

    out = Path(cfg.out)
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg.model).to(device)
    text_encoder = build_text_encoder(cfg.model, tokenizer).to(device)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    named = {f"unet.{k}": p for k, p in unet.named_parameters()}
    if cfg.train_text_encoder:
        named.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()})
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = EMA(named, cfg.ema_decay)
    scheduler = noise_scheduler(
        {
            "beta_schedule": cfg.beta_schedule,
            "prediction_type": cfg.prediction_type,
            "rescale_betas_zero_snr": cfg.rescale_zero_snr,
        }
    )

    # latents of the whole bank, and the 270 prompts (+ the empty one, for guidance) tokenized once
    means, stds = encode_bank(vae, bank, device)
    scaling_factor = float(1.0 / means.std())
    if cfg.vae_from:  # a shipped VAE: keep the scaling factor its pipeline samples with
        scaling_factor = float(vae.config.scaling_factor)
    token_ids = tokenize_prompts(tokenizer, device)

    modules = {"unet": unet, "text_encoder": text_encoder}
    loop = Loop("unet", cfg, modules, opt, device, ema=ema, meta={"scaling_factor": scaling_factor})
    if loop.resumed:
        scaling_factor = loop.meta["scaling_factor"] = loop.resumed["scaling_factor"]
    vae.register_to_config(scaling_factor=scaling_factor)
    loop.on_save.append(
        lambda meta: export_pipeline(cfg, vae, tokenizer, unet, text_encoder, ema, out / "model", meta)
    )
    batches = DenoisingBatches(
        means, stds, bank_prompts, scaling_factor, scheduler,
        seed=cfg.seed, stream=500_000, cfg_dropout=cfg.cfg_dropout, high_noise=cfg.high_noise,
    )  # fmt: skip

    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    if not cfg.train_text_encoder:  # frozen: encode the 271 prompts once
        contexts = encode_prompts(text_encoder, token_ids)

    def train_step(step: int) -> dict:
        batch = batches(step, cfg.batch_size)
        set_lr(opt, cfg.lr * warmup(step, cfg.warmup_steps))
        with autocast(device):
            if cfg.train_text_encoder:
                context = text_encoder(token_ids[batch.prompts])[0]
            else:
                context = contexts[batch.prompts]
            pred = unet(batch.noisy, batch.timesteps, context).sample
        loss = per_example_mse(pred, batch.target)
        if cfg.snr_gamma > 0 or cfg.snr_floor > 0:
            loss = loss * snr_weight(scheduler, batch.timesteps, cfg.snr_gamma, cfg.snr_floor)
        loss = loss.mean()
        optimizer_step(opt, loss, params)
        ema.update(step)
        return {"loss": loss}

    loop.run(train_step)


def export_pipeline(
    cfg: ShapesConfig, vae, tokenizer, unet, text_encoder, ema: EMA, folder: Path, meta: dict
):
    """Save a ``StableDiffusionPipeline`` with the EMA weights (safetensors, fp32) into ``folder``."""
    from diffusers import StableDiffusionPipeline

    from labkit.shapes.build import build_scheduler, count_parameters
    from labkit.shapes.tokenizer import fit_tokenizer

    unet_ema = copy.deepcopy(unet).float().cpu()
    text_ema = copy.deepcopy(text_encoder).float().cpu()
    unet_ema.load_state_dict({k: v.cpu() for k, v in ema.part("unet").items()}, strict=False)
    text_ema.load_state_dict({k: v.cpu() for k, v in ema.part("text_encoder").items()}, strict=False)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).float().cpu(),
        text_encoder=text_ema.eval(),
        tokenizer=tokenizer,
        unet=unet_ema.eval(),
        scheduler=build_scheduler(cfg.prediction_type, cfg.beta_schedule, cfg.rescale_zero_snr),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; write SD's vocab.json + merges.txt too (transformers 4 reads them)
    fit_tokenizer(folder / "tokenizer")
    info = {
        "unet_steps": meta["step"],
        "unet_minutes": round(meta["elapsed"] / 60, 2),
        "parameters": {
            "text_encoder": count_parameters(text_ema),
            "vae": count_parameters(pipe.vae),
            "unet": count_parameters(unet_ema),
        },
        "train_config": cfg.to_dict(),
        "torch": torch.__version__,
    }
    (folder / "labkit_shapes.json").write_text(json.dumps(info, indent=2) + "\n")
    return pipe


# ----------------------------------------------------------------------------------------------------------
# the whole run


def train(
    cfg: ShapesConfig,
    stages: tuple[str, ...] = STAGES,
    export: str | None = None,
    exporter: Callable[[Path, Path], object] = copy_folder,
) -> dict:
    """Run the chosen stages; returns a summary (timings, quick held-out accuracy), also in ``OUT/summary.json``.

    After the UNet stage, ``exporter(OUT/model, export)`` copies the pipeline to ``export`` if given.
    """
    from labkit.shapes.build import build_vae
    from labkit.shapes.tokenizer import fit_tokenizer

    check_stages(stages)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": str(device), "stages": list(stages)}
    start = time.perf_counter()

    tokenizer = fit_tokenizer(out / "tokenizer")
    t0 = time.perf_counter()
    bank, bank_prompts = make_bank(cfg.bank_size, cfg.seed, device)
    summary["bank_seconds"] = round(time.perf_counter() - t0, 1)
    if cfg.vae_from:
        vae = load_vae(cfg.vae_from, device)
    elif "vae" in stages:
        vae = train_vae(cfg, bank, device)
    else:
        vae = build_vae(cfg.model).to(device)
        load_checkpoint(out / "checkpoints" / "vae.safetensors", {"vae": vae}, None, None, device)
        vae.eval()
    vae.requires_grad_(False)
    if "unet" in stages:
        train_unet(cfg, vae, tokenizer, bank, bank_prompts, device)
        if export:
            exporter(out / "model", Path(export))
            summary["exported_to"] = str(export)
        if cfg.eval_n > 0:
            summary["eval"] = quick_eval(load_pipeline(str(out / "model"), device=device), cfg.eval_n)
    return write_summary(out, summary, start)


def check_stages(stages: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``stages`` is a non-empty selection of `STAGES`."""
    if not stages or set(stages) - set(STAGES):
        raise ValueError(f"stages {','.join(stages)!r}: choose from {', '.join(STAGES)} (comma-separated)")


def add_arguments(
    parser: argparse.ArgumentParser,
    presets: dict = PRESETS,
    export: str = "also copy the final pipeline here, e.g. labkit/shapes/model",
) -> None:
    add_config_arguments(parser, ShapesConfig, presets, texts=HELP, choices=CHOICES)
    add_job_arguments(parser, export=export)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ShapesConfig, PRESETS, args)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    check_stages(stages)
    return run_job(args, cfg.out, lambda: train(cfg, stages, export=args.export))


def _add_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}"
    )


TRAINER = Trainer(
    help="the shapes model: its VAE, then its UNet (text encoder frozen)",
    add_arguments=_add_shapes_arguments,
    run=run,
)
