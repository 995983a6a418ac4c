"""Fine-tune the shapes VAE's decoder for MSE (``labkit train vae``): the lab's ``sd-vae-ft-mse``.

One command (a few minutes on a CPU) writes the tuned VAE where the ``swap_vae`` optimization finds it::

    labkit train vae --export labkit/shapes/variants/vae          # the shipped model -> its tuned VAE
    labkit train vae --steps 50 --out runs/vae-try                 # a quick try, kept in runs/vae-try/vae

What ``sd-vae-ft-mse`` did, and what this does the same way: Stable Diffusion's VAE was fine-tuned with
its **encoder frozen**, only the decoder learning (first on an L1 + LPIPS loss with EMA weights, then with
more weight on MSE, which gives smoother, higher-PSNR images). A frozen encoder means the latent space the
UNet was trained on does not move, so the new VAE drops into every pipeline of that model: only the last
step, decoding, changes. Here the encoder is frozen too; the decoder trains on reconstructions of fresh
procedural images, from latents sampled from the frozen encoder's posterior (what the UNet learnt from),
with an MSE loss and a cosine-decaying learning rate (the shipped VAE was trained at a constant rate).
The result is saved with ``AutoencoderKL.save_pretrained`` (safetensors) to ``OUT/vae`` beside
``tuning.json``: the recipe, the time it took and the reconstruction PSNR before and after on held-out
images. Used for the latent diffusion chapter (2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from labkit.quality import encoder_fingerprint, reconstruction_psnr
from labkit.shapes import data
from labkit.training.jobs import (
    Loop,
    TrainConfig,
    copy_folder,
    load_vae,
    optimizer_step,
    pick_device,
    set_lr,
    trainer,
    warmup,
    write_summary,
)


@dataclass
class VaeConfig(TrainConfig):
    """Everything a decoder-tuning run depends on. ``PRESETS`` holds the recipes."""

    out: str = "runs/vae"
    model: str = "shapes"  # the pipeline whose VAE is tuned: "shapes" (the shipped model) or a folder
    device: str = "cpu"  # what the shipped VAE was tuned on; a GPU draws other numbers
    steps: int = 600
    minutes: float = 10.0
    lr: float = 5e-4
    warmup_steps: int = 20
    eval_n: int = 500


PRESETS: dict[str, dict] = {
    # the shipped tuned VAE: a few minutes on a CPU
    "cpu": {},
    # seconds, for tests and CI
    "ci": dict(steps=4, batch_size=4, warmup_steps=2, eval_n=8, log_every=1),
}

HELP = {
    "out": "work folder: checkpoints/, vae/ (the tuned VAE), logs",
    "model": "the pipeline whose VAE is tuned: shapes (the shipped model) or a folder",
    "warmup_steps": "steps of linear learning-rate warm-up (then cosine decay to 0)",
    "eval_n": "held-out images whose reconstruction PSNR is measured before and after (0: skip)",
}


def _to_model(images: np.ndarray, device) -> torch.Tensor:
    """NHWC [0, 1] numpy -> NCHW [-1, 1] tensor, the VAE's input range."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return x.to(device) * 2 - 1


def tune_decoder(cfg: VaeConfig, export: str | None = None) -> dict:
    """Fine-tune the decoder of the ``cfg.model`` pipeline's VAE; save it to ``OUT/vae`` (and ``export``).

    The encoder and ``quant_conv`` are frozen; ``post_quant_conv`` and the decoder learn with AdamW on
    an MSE loss, ``lr`` warmed up over ``warmup_steps`` then decayed to 0 (cosine) over ``steps`` (or
    until ``minutes`` have passed). Returns the ``tuning.json`` record: steps, seconds, and the
    reconstruction PSNR before and after on ``eval_n`` held-out images.
    """
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = load_vae(cfg.model, device)
    fingerprint = encoder_fingerprint(vae)
    psnr_before = reconstruction_psnr(vae, cfg.eval_n) if cfg.eval_n else None

    trainable = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:
        trainable += list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)

    def rate(step: int) -> float:
        if step < cfg.warmup_steps:
            return warmup(step, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []

    def train_step(step: int) -> dict:
        batch = data.sample(cfg.batch_size, seed=cfg.seed * 1_000_003 + 7_000_000 + step, split="train")
        x = _to_model(batch.images, device)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        set_lr(opt, cfg.lr * rate(step))
        loss = F.mse_loss(vae.decode(z).sample.float(), x)
        optimizer_step(opt, loss, trainable)
        losses.append(loss.item())
        return {"mse": loss}

    vae.decoder.train()
    loop = Loop("vae", cfg, {"vae": vae}, opt, device, generators={"posterior": g})
    loop.run(train_step)
    vae.eval().requires_grad_(False)
    psnr_after = reconstruction_psnr(vae, cfg.eval_n) if cfg.eval_n else None

    folder = out / "vae"
    vae.save_pretrained(str(folder), safe_serialization=True)
    info = {
        "base": cfg.model,
        "encoder_fingerprint": fingerprint,
        "steps": loop.step,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        "seconds": round(loop.clock.elapsed, 1),
        "device": str(device),
        "final_mse": float(np.mean(losses[-20:])) if losses else None,
        "eval_n": cfg.eval_n,
        "psnr_before_db": psnr_before,
        "psnr_after_db": psnr_after,
        "torch": torch.__version__,
    }
    (folder / "tuning.json").write_text(json.dumps(info, indent=2) + "\n")
    if export:
        copy_folder(folder, Path(export))
    return write_summary(out, info)


TRAINER = trainer(
    "the shapes VAE with its decoder fine-tuned for MSE (encoder frozen), as sd-vae-ft-mse",
    VaeConfig,
    PRESETS,
    lambda cfg, args: tune_decoder(cfg, export=args.export),
    export="also save the tuned VAE here, e.g. labkit/shapes/variants/vae",
    texts=HELP,
)
