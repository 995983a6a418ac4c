"""Train the shapes model: the VAE first, then the UNet and the text encoder together.

One command does it (``labkit train-shapes``, or ``python -m labkit.shapes.train``)::

    # CPU (the shipped model): 12 + 28 minutes (time budgets) on a busy 2-core machine
    labkit train-shapes --preset cpu --threads 1 --out runs/shapes --export labkit/shapes/model

    # one GPU (an H100): at most 10 minutes
    labkit train-shapes --preset gpu --device cuda --out runs/shapes-gpu --export labkit/shapes/model

    # the classifier behind labkit.quality (a few minutes on a CPU)
    labkit train-shapes --stages classifier

    # a variant for the custom-scheduler chapter: v-prediction on cosine betas with zero terminal SNR,
    # on the shipped VAE (--vae-from skips the VAE stage), then `python -m labkit.schedulers ship`
    labkit train-shapes --preset gpu --device cuda --stages unet --vae-from labkit/shapes/model \\
        --prediction-type v_prediction --beta-schedule squaredcos_cap_v2 --rescale-zero-snr --out runs/vpred-gpu

How it trains:

1. **Data**: a bank of procedurally drawn training images (``--bank-size``, uint8, on the device) so that
   the device never waits for numpy; its prompts are tokenized once (there are only 270).
2. **VAE** (``AutoencoderKL``, f=4): MSE reconstruction, weighted 11x on the shape's pixels (a small
   shape is 2% of the image; unweighted, its colour drifts), plus a tiny KL term (weight 1e-6, as in SD's
   VAE, so the latents stay close to deterministic); the learning rate decays (cosine) to 10%. Afterwards the bank is encoded once and
   ``scaling_factor`` is set to 1 / std of the latents (SD 1.5's 0.18215 was found the same way).
3. **UNet**, with the text encoder **frozen at its random initialisation** (``--train-text-encoder`` trains
   it jointly instead). Trained jointly, the encoder learnt to shout the colour (a colour word changed every
   later token's output by 13, at a norm of 8) and to all but erase the position words (0.3, and 0.03 on
   later tokens): the UNet, which learns colour first, gave no reason to keep them, and after 2000 steps
   "top left" and "bottom right" produced the same UNet output to 3 decimals. A frozen random encoder
   keeps every word distinct; the UNet's cross-attention projections learn to read what they need. (It
   also means the 271 prompt encodings are computed once.) The noise, the
   timesteps and the ``--prediction-type`` / ``--beta-schedule`` / ``--rescale-zero-snr`` choices are those of
   diffusers' ``DDPMScheduler``; the loss uses min-SNR-5 weighting (Hang et al., 2023), which converges faster
   at equal steps; 10% of prompts are dropped to "" for classifier-free guidance; an EMA of the weights is
   what gets exported.

Checkpoints (``OUT/checkpoints/*.safetensors`` + ``.json``: weights, optimizer, EMA, step, elapsed time) are
written every ``--checkpoint-minutes`` and on Ctrl-C or SIGTERM, and every UNet checkpoint also exports the pipeline to
``OUT/model``. Running the same command again resumes where it stopped; a stage that reached its step count
or its time budget is skipped. Used in the shapes chapter.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import data
from .build import ModelConfig, build_scheduler, build_text_encoder, build_unet, build_vae, count_parameters
from .tokenizer import MAX_LENGTH, fit_tokenizer

STAGES = ("vae", "unet", "classifier")


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``PRESETS`` holds the shipped recipes."""

    out: str = "runs/shapes"
    device: str = "auto"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    bank_size: int = 20_000
    # VAE stage
    vae_steps: int = 1200
    vae_minutes: float = 12.0
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    foreground_weight: float = 10.0
    # UNet stage
    unet_steps: int = 8000
    unet_minutes: float = 28.0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    rescale_zero_snr: bool = False
    snr_gamma: float = 5.0
    snr_floor: float = 0.0
    high_noise: float = 0.0
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    train_text_encoder: bool = False
    # start the UNet stage from this pipeline folder's VAE (and its scaling_factor) instead of OUT's checkpoint
    vae_from: str | None = None
    # bookkeeping
    checkpoint_minutes: float = 2.0
    log_every: int = 20
    eval_n: int = 200
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


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
        unet_steps=30_000,
        unet_minutes=6.5,
        batch_size=256,
        lr=1e-3,
        warmup_steps=300,
        ema_decay=0.9995,
        eval_n=500,
    ),
    # seconds, for tests: a model of a few thousand parameters
    "tiny": dict(
        model=ModelConfig.tiny(),
        bank_size=64,
        vae_steps=3,
        vae_batch_size=8,
        unet_steps=4,
        batch_size=8,
        warmup_steps=1,
        eval_n=0,
        log_every=1,
    ),
}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if present, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------
# checkpoints: safetensors for every tensor (weights, optimizer moments, EMA), json for the rest


def _save_checkpoint(path: Path, modules: dict, optimizer, ema: dict | None, meta: dict) -> None:
    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().cpu().contiguous()
    state = optimizer.state_dict()
    opt_meta = {"param_groups": state["param_groups"], "scalars": {}}
    for pid, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_meta["scalars"][f"{pid}.{k}"] = v
    for k, v in (ema or {}).items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    meta = dict(meta, optimizer=opt_meta)
    tmp_json = path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, path.with_suffix(".json"))


def _load_checkpoint(path: Path, modules: dict, optimizer, ema: dict | None, device) -> dict:
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    for name, module in modules.items():
        prefix = f"model.{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, key = k.split(".", 2)
                state.setdefault(int(pid), {})[key] = v.to(device)
        for k, v in meta["optimizer"]["scalars"].items():
            pid, key = k.split(".", 1)
            state.setdefault(int(pid), {})[key] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"].to(device))
    return meta


# ----------------------------------------------------------------------------------------------------------
# data


def prompt_index(labels: dict[str, np.ndarray]) -> np.ndarray:
    """Index of each image's prompt in :func:`labkit.shapes.data.all_prompts`."""
    sizes = [len(v) for v in data.ATTRIBUTES.values()]
    index = np.zeros_like(labels["shape"])
    for name, n in zip(data.ATTRIBUTES, sizes, strict=True):
        index = index * n + labels[name]
    return index


def make_bank(n: int, seed: int, device, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images as uint8 NCHW on ``device`` and the index of each one's prompt."""
    images, index = [], []
    for i, start in enumerate(range(0, n, chunk)):
        batch = data.sample(min(chunk, n - start), seed=seed * 1_000_003 + i, split="train")
        images.append(torch.from_numpy((batch.images * 255 + 0.5).astype(np.uint8)).permute(0, 3, 1, 2))
        index.append(torch.from_numpy(prompt_index(batch.labels)))
    return torch.cat(images).to(device), torch.cat(index).to(device)


def _to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return images_u8.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# the two stages


class _Clock:
    """Elapsed training time that survives resumes, and a checkpoint timer."""

    def __init__(self, elapsed: float, every_minutes: float):
        self.start = time.perf_counter() - elapsed
        self.last = time.perf_counter()
        self.every = every_minutes * 60

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def due(self) -> bool:
        if time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            return True
        return False


def _log(out: Path, record: dict) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _foreground_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weight: ``1 + weight`` on the shape, 1 on the background (the image's median colour).

    A small shape covers about 2% of the pixels, so with a plain MSE its colour and outline barely count;
    weighting them keeps small green triangles green and triangular.
    """
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    foreground = ((x - background).abs().sum(1, keepdim=True) > 0.2).float()
    return 1.0 + weight * foreground


def train_vae(cfg: TrainConfig, bank: torch.Tensor, device: torch.device) -> torch.nn.Module:
    """Stage 1: the ``AutoencoderKL`` on the image bank; resumes from ``OUT/checkpoints/vae.safetensors``."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    ckpt = out / "checkpoints" / "vae.safetensors"
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.model).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ckpt.exists():
        meta = _load_checkpoint(ckpt, {"vae": vae}, opt, None, device)
        step, elapsed = meta["step"], meta["elapsed"]
    clock = _Clock(elapsed, cfg.checkpoint_minutes)

    def save():
        meta = {"stage": "vae", "step": step, "elapsed": clock.elapsed, "config": cfg.to_dict()}
        _save_checkpoint(ckpt, {"vae": vae}, opt, None, meta)

    budget = cfg.vae_minutes * 60
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", disable=not cfg.progress)
    vae.train()
    try:
        while step < cfg.vae_steps and clock.elapsed < budget:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(bank), (cfg.vae_batch_size,), generator=g).to(device)
            x = _to_float(bank[idx])
            for group in opt.param_groups:  # cosine decay to 10% over the planned steps
                group["lr"] = cfg.vae_lr * (0.55 + 0.45 * math.cos(math.pi * step / cfg.vae_steps))
            with _autocast(device):
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample()).sample
            squared = (recon.float() - x).pow(2)
            mse = squared.mean()
            loss = (_foreground_weight(x, cfg.foreground_weight) * squared).mean()
            loss = loss + cfg.kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # images span [-1, 1]
                bar.set_postfix(mse=f"{mse.item():.5f}", psnr=f"{psnr:.1f}")
                _log(
                    out, {"stage": "vae", "step": step, "mse": mse.item(), "elapsed": round(clock.elapsed, 1)}
                )
            if clock.due():
                save()
    except KeyboardInterrupt:
        save()
        raise
    bar.close()
    save()
    return vae.eval()


@torch.no_grad()
def encode_bank(vae, bank: torch.Tensor, device, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every bank image (the UNet samples from them)."""
    means, stds = [], []
    for i in range(0, len(bank), batch_size):
        with _autocast(device):
            dist = vae.encode(_to_float(bank[i : i + batch_size])).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _snr_weight(
    noise_scheduler, timesteps: torch.Tensor, gamma: float, floor: float, prediction_type: str
) -> torch.Tensor:
    """Loss weights that clip the SNR to [floor, gamma], for epsilon or v targets.

    ``gamma`` is min-SNR-gamma (Hang et al., 2023): less weight on the nearly clean steps. ``floor`` does the
    opposite at the noisy end: an epsilon loss weighs errors in the clean image by the SNR, nearly 0 at the
    first sampling steps, which is exactly where the layout (the shape's *position*) is decided; clipping
    the SNR from below gives those steps the weight of SNR ``floor``.
    """
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp(min=1e-8)
    clipped = snr.clamp(min=floor, max=gamma if gamma > 0 else None)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def _sample_timesteps(
    n: int, num_train_timesteps: int, high_noise: float, g: torch.Generator
) -> torch.Tensor:
    """Uniform timesteps, except that a fraction ``high_noise`` is drawn from the noisiest 30%."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=g)
    high = torch.randint(int(0.7 * num_train_timesteps), num_train_timesteps, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < high_noise, high, t)


def train_unet(
    cfg: TrainConfig,
    vae,
    tokenizer,
    bank: torch.Tensor,
    bank_prompts: torch.Tensor,
    device: torch.device,
) -> None:
    """Stage 2: the UNet and the text encoder together, on latents of the bank; exports to ``OUT/model``."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    ckpt = out / "checkpoints" / "unet.safetensors"
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg.model).to(device)
    text_encoder = build_text_encoder(cfg.model, tokenizer).to(device)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    named = {f"unet.{k}": p for k, p in unet.named_parameters()}
    if cfg.train_text_encoder:
        named.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()})
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = {k: p.detach().clone().float() for k, p in named.items()}
    ema_values, param_values = list(ema.values()), list(named.values())
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_zero_snr,
    )

    # latents of the whole bank, and the 270 prompts (+ the empty one, for guidance) tokenized once
    means, stds = encode_bank(vae, bank, device)
    scaling_factor = float(1.0 / means.std())
    if cfg.vae_from:  # a shipped VAE: keep the scaling factor its pipeline samples with
        scaling_factor = float(vae.config.scaling_factor)
    prompts = data.all_prompts() + [""]
    ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    token_ids = ids.input_ids.to(device)
    empty = len(prompts) - 1

    step, elapsed = 0, 0.0
    if ckpt.exists():
        meta = _load_checkpoint(ckpt, {"unet": unet, "text_encoder": text_encoder}, opt, ema, device)
        step, elapsed = meta["step"], meta["elapsed"]
        scaling_factor = meta["scaling_factor"]
    vae.register_to_config(scaling_factor=scaling_factor)
    clock = _Clock(elapsed, cfg.checkpoint_minutes)

    def save():
        meta = {
            "stage": "unet",
            "step": step,
            "elapsed": clock.elapsed,
            "scaling_factor": scaling_factor,
            "config": cfg.to_dict(),
        }
        _save_checkpoint(ckpt, {"unet": unet, "text_encoder": text_encoder}, opt, ema, meta)
        export_pipeline(cfg, vae, tokenizer, unet, text_encoder, ema, out / "model", meta)

    budget = cfg.unet_minutes * 60
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="unet", disable=not cfg.progress)
    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    if not cfg.train_text_encoder:  # frozen: encode the 271 prompts once
        with torch.no_grad():
            contexts = text_encoder(token_ids)[0]
    try:
        while step < cfg.unet_steps and clock.elapsed < budget:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_000 + step)
            n = cfg.batch_size
            idx = torch.randint(0, len(bank), (n,), generator=g).to(device)
            eps = torch.randn(means[idx].shape, generator=g).to(device)
            latents = (means[idx] + stds[idx] * eps) * scaling_factor
            noise = torch.randn(latents.shape, generator=g).to(device)
            timesteps = _sample_timesteps(
                n, noise_scheduler.config.num_train_timesteps, cfg.high_noise, g
            ).to(device)
            drop = (torch.rand(n, generator=g) < cfg.cfg_dropout).to(device)
            prompt = torch.where(drop, torch.full_like(bank_prompts[idx], empty), bank_prompts[idx])
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if cfg.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            with _autocast(device):
                if cfg.train_text_encoder:
                    context = text_encoder(token_ids[prompt])[0]
                else:
                    context = contexts[prompt]
                pred = unet(noisy, timesteps, context).sample
            loss = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            if cfg.snr_gamma > 0 or cfg.snr_floor > 0:
                weight = _snr_weight(
                    noise_scheduler, timesteps, cfg.snr_gamma, cfg.snr_floor, cfg.prediction_type
                )
                loss = loss * weight
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_values, param_values, 1 - decay)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                _log(
                    out,
                    {"stage": "unet", "step": step, "loss": loss.item(), "elapsed": round(clock.elapsed, 1)},
                )
            if clock.due():
                save()
    except KeyboardInterrupt:
        save()
        raise
    bar.close()
    save()


def export_pipeline(
    cfg: TrainConfig, vae, tokenizer, unet, text_encoder, ema: dict, folder: Path, meta: dict
):
    """Save a ``StableDiffusionPipeline`` with the EMA weights (safetensors, fp32) into ``folder``."""
    from diffusers import StableDiffusionPipeline

    unet_ema = copy.deepcopy(unet).float().cpu()
    text_ema = copy.deepcopy(text_encoder).float().cpu()
    unet_ema.load_state_dict({k[5:]: v.cpu() for k, v in ema.items() if k.startswith("unet.")}, strict=False)
    text_ema.load_state_dict(
        {k[13:]: v.cpu() for k, v in ema.items() if k.startswith("text_encoder.")}, strict=False
    )
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


def train(cfg: TrainConfig, stages: tuple[str, ...] = ("vae", "unet"), export: str | None = None) -> dict:
    """Run the chosen stages; returns a summary (timings, parameter counts, quick held-out accuracy).

    Used in the shapes chapter; ``labkit train-shapes`` calls it through :func:`cli_main`.
    """
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": str(device), "stages": list(stages)}
    start = time.perf_counter()

    if "classifier" in stages:
        from ..quality import train_classifier

        summary["classifier_accuracy"] = train_classifier(
            seed=cfg.seed, device=str(device), progress=cfg.progress
        )

    if "vae" in stages or "unet" in stages:
        tokenizer = fit_tokenizer(out / "tokenizer")
        t0 = time.perf_counter()
        bank, bank_prompts = make_bank(cfg.bank_size, cfg.seed, device)
        summary["bank_seconds"] = round(time.perf_counter() - t0, 1)
        if cfg.vae_from:
            vae = load_vae_from(cfg.vae_from, device)
        elif "vae" in stages:
            vae = train_vae(cfg, bank, device)
        else:
            vae = build_vae(cfg.model).to(device)
            _load_checkpoint(out / "checkpoints" / "vae.safetensors", {"vae": vae}, None, None, device)
            vae.eval()
        vae.requires_grad_(False)
        if "unet" in stages:
            train_unet(cfg, vae, tokenizer, bank, bank_prompts, device)
            if export:
                _copy_model(out / "model", Path(export))
                summary["exported_to"] = str(export)
            if cfg.eval_n > 0:
                summary["eval"] = quick_eval(out / "model", cfg.eval_n, device)

    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_vae_from(folder: str | Path, device) -> torch.nn.Module:
    """The VAE of a saved shapes pipeline (``--vae-from``), e.g. to train a UNet variant on the shipped VAE."""
    from diffusers import AutoencoderKL

    path = Path(folder) / "vae"
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"--vae-from {folder}: no {path}/config.json; give a pipeline folder such as labkit/shapes/model"
        )
    return AutoencoderKL.from_pretrained(str(path)).to(device).eval()


def _copy_model(src: Path, dst: Path) -> None:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def quick_eval(model_dir: Path, n: int, device) -> dict:
    """Prompt accuracy and FID of a trained model with DPM-Solver++ at 20 steps (needs the classifier)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from .. import quality
    from . import CLASSIFIER_PATH

    if not CLASSIFIER_PATH.exists():
        return {"skipped": "no classifier; run `labkit train-shapes --stages classifier`"}
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir)).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = quality.evaluate(pipe, n=n)
    return {k: v for k, v in result.items() if k != "images"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labkit train-shapes",
        description="Train the shapes model (VAE, then UNet + text encoder) or the shapes classifier.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the defaults below (cpu)")
    p.add_argument("--stages", default="vae,unet", help=f"comma-separated, from {','.join(STAGES)}")
    p.add_argument("--out", default=None, help="work folder: checkpoints/, model/, logs (runs/shapes)")
    p.add_argument(
        "--export", default=None, help="also copy the final pipeline here, e.g. labkit/shapes/model"
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None)
    p.add_argument("--beta-schedule", choices=["scaled_linear", "squaredcos_cap_v2", "linear"], default=None)
    p.add_argument("--rescale-zero-snr", action="store_true", default=None, help="zero terminal SNR betas")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-minutes", type=float, default=None, help="time budget of the VAE stage")
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--unet-minutes", type=float, default=None, help="time budget of the UNet stage")
    p.add_argument("--batch-size", type=int, default=None, help="UNet batch size")
    p.add_argument("--lr", type=float, default=None, help="UNet + text encoder learning rate")
    p.add_argument("--bank-size", type=int, default=None, help="training images drawn up front")
    p.add_argument("--train-text-encoder", action="store_true", default=None, help="train it with the UNet")
    p.add_argument(
        "--vae-from",
        default=None,
        help="skip the VAE stage: use this pipeline folder's VAE (labkit/shapes/model)",
    )
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the exported weights (0.999)")
    p.add_argument("--snr-gamma", type=float, default=None, help="loss weight: clip the SNR above (5)")
    p.add_argument("--snr-floor", type=float, default=None, help="loss weight: clip the SNR below (0: off)")
    p.add_argument("--high-noise", type=float, default=None, help="share of timesteps from the noisiest 30%%")
    p.add_argument("--checkpoint-minutes", type=float, default=None)
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts scored at the end (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, try 1)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from the preset, overridden by the flags that were given."""
    cfg = TrainConfig(**PRESETS[args.preset])
    names = (
        "out",
        "device",
        "seed",
        "prediction_type",
        "beta_schedule",
        "rescale_zero_snr",
        "vae_steps",
        "vae_minutes",
        "unet_steps",
        "unet_minutes",
        "batch_size",
        "lr",
        "bank_size",
        "ema_decay",
        "train_text_encoder",
        "vae_from",
        "snr_gamma",
        "snr_floor",
        "high_noise",
        "checkpoint_minutes",
        "eval_n",
    )
    return override(cfg, args, names)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def override(cfg, args: argparse.Namespace, names: Iterable[str]):
    """Set each of ``names`` on ``cfg`` from the flag of that name, where it was given; ``--no-progress``."""
    for name in names:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if getattr(args, "no_progress", False):
        cfg.progress = False
    return cfg


def run_job(args: argparse.Namespace, out: str | Path, job: Callable[[], dict]) -> int:
    """What the training commands share (train-shapes, ``shapes.distill``, ``shapes.qat``): ``--threads``,
    ``--fresh``, then ``job()`` with SIGTERM (a killed job, a CI timeout) saving a checkpoint as Ctrl-C does,
    and the summary printed as JSON. Returns the exit status (130 when interrupted)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh:
        import shutil

        shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
    try:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        summary = job()
    except KeyboardInterrupt:
        print("interrupted: checkpoints saved; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps(summary, indent=2))
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    """``labkit train-shapes``: parse the flags, train, print the summary. Returns the exit status."""
    args = build_parser().parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(stages) - set(STAGES)
    if unknown:
        print(
            f"unknown stage(s): {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}",
            file=sys.stderr,
        )
        return 2
    cfg = config_from_args(args)
    return run_job(args, cfg.out, lambda: train(cfg, stages, export=args.export))


if __name__ == "__main__":
    sys.exit(cli_main())
