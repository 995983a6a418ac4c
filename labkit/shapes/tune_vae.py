"""Fine-tune the shapes VAE's decoder for MSE: the lab's analogue of Stability AI's ``sd-vae-ft-mse``.

One command (a few minutes on a CPU) writes the tuned VAE where `labkit.tiers.swap_vae` finds it::

    python -m labkit.shapes.tune_vae                         # the shipped model -> labkit/shapes/variants/vae
    python -m labkit.shapes.tune_vae --steps 50 --out /tmp/vae   # a quick try elsewhere

What ``sd-vae-ft-mse`` did, and what this does the same way: Stable Diffusion's VAE was fine-tuned with
its **encoder frozen**, only the decoder learning (first on an L1 + LPIPS loss with EMA weights, then with
more weight on MSE, which gives smoother, higher-PSNR images). A frozen encoder means the latent space the
UNet was trained on does not move, so the new VAE drops into every pipeline of that model: only the last
step, decoding, changes. Here the encoder is frozen too; the decoder trains on reconstructions of fresh
procedural images, from latents sampled from the frozen encoder's posterior (what the UNet learnt from),
with an MSE loss and a cosine-decaying learning rate (the shipped VAE was trained at a constant rate).
The result is saved with ``AutoencoderKL.save_pretrained`` (safetensors) beside ``tuning.json``: the
recipe, the time it took and the reconstruction PSNR before and after on held-out images.

Used in the latent diffusion chapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import MODEL_DIR
from . import data as shapes_data

VARIANT_DIR = Path(__file__).parent / "variants" / "vae"
"""Where the tuned VAE ships (``labkit.tiers.swap_vae`` looks here for the ``shapes`` source)."""


def load_vae(folder: str | Path | None = None, device: str = "cpu"):
    """An ``AutoencoderKL`` from a VAE folder, or the shipped model's (``MODEL_DIR/vae``), fp32, eval mode."""
    from diffusers import AutoencoderKL

    folder = Path(folder) if folder is not None else Path(MODEL_DIR) / "vae"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no VAE at {folder}: train the shapes model first (`labkit train-shapes`)")
    return AutoencoderKL.from_pretrained(folder, use_safetensors=True).to(device).eval()


def _to_model(images: np.ndarray, device) -> torch.Tensor:
    """NHWC [0, 1] numpy -> NCHW [-1, 1] tensor, the VAE's input range."""
    return (
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(device) * 2
        - 1
    )


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mode) and decode ``images`` (NHWC in [0, 1]); returns NHWC in [0, 1]."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = _to_model(images[i : i + batch_size], device)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((y.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def reconstruction_psnr(vae, n: int = 500, seed: int = 0) -> float:
    """Mean PSNR (dB) of ``vae``'s reconstructions of ``n`` held-out real images (`labkit.quality.psnr`).

    Used in the latent diffusion chapter, before and after tuning the decoder.
    """
    from labkit.quality import psnr

    images = shapes_data.heldout(n, seed=seed).images
    return psnr(images, reconstruct(vae, images))


def encoder_fingerprint(vae) -> str:
    """A short hash of the encoder's weights (encoder and ``quant_conv``).

    Equal for VAEs that share a latent space, such as a VAE and its tuned-decoder variant.
    """
    h = hashlib.sha256()
    for module in (vae.encoder, vae.quant_conv):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tune_decoder(
    model_dir: str | Path | None = None,
    out: str | Path = VARIANT_DIR,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 5e-4,
    warmup_steps: int = 20,
    minutes: float = 10.0,
    eval_n: int = 500,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Fine-tune the decoder of the VAE in ``model_dir`` (default: the shipped model) and save it to ``out``.

    The encoder and ``quant_conv`` are frozen; ``post_quant_conv`` and the decoder learn with AdamW on
    an MSE loss, ``lr`` warmed up over ``warmup_steps`` then decayed to 0 (cosine) over ``steps``
    (or until ``minutes`` have passed). Returns the ``tuning.json`` record: steps, seconds, and the
    reconstruction PSNR before and after on ``eval_n`` held-out images. Used in the latent diffusion
    chapter; command: ``python -m labkit.shapes.tune_vae``.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    base_dir = Path(model_dir) / "vae" if model_dir is not None else Path(MODEL_DIR) / "vae"
    vae = load_vae(base_dir, device)
    fingerprint = encoder_fingerprint(vae)
    psnr_before = reconstruction_psnr(vae, eval_n) if eval_n else None

    trainable = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:
        trainable += list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

    def rate(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    vae.decoder.train()
    losses = []
    step = 0
    bar = tqdm(total=steps, desc="decoder", disable=not progress)
    while step < steps and time.perf_counter() - start < minutes * 60:
        batch = shapes_data.sample(batch_size, seed=seed * 1_000_003 + 7_000_000 + step, split="train")
        x = _to_model(batch.images, device)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(mse=f"{np.mean(losses[-20:]):.5f}")
    bar.close()
    seconds = time.perf_counter() - start
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    psnr_after = reconstruction_psnr(vae, eval_n) if eval_n else None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(out), safe_serialization=True)
    info = {
        "base": str(base_dir),
        "encoder_fingerprint": fingerprint,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "seconds": round(seconds, 1),
        "device": str(device),
        "final_mse": float(np.mean(losses[-20:])) if losses else None,
        "eval_n": eval_n,
        "psnr_before_db": psnr_before,
        "psnr_after_db": psnr_after,
        "torch": torch.__version__,
    }
    (out / "tuning.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def variant_info(folder: str | Path = VARIANT_DIR) -> dict | None:
    """The ``tuning.json`` of a tuned VAE folder (how it was made), or ``None`` if there is none."""
    path = Path(folder) / "tuning.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labkit.shapes.tune_vae", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default=None, help="shapes pipeline folder (default: the shipped model)")
    parser.add_argument("--out", default=str(VARIANT_DIR), help="where the tuned VAE goes")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="stop after this long even if steps remain"
    )
    parser.add_argument(
        "--eval-n", type=int, default=500, help="held-out images for the PSNR before and after"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    info = tune_decoder(
        args.model,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        minutes=args.minutes,
        eval_n=args.eval_n,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
