"""Quantization-aware training (QAT) of the shipped shapes UNet with torchao, in one command::

    # CPU (the shipped variant): a few minutes on 1 thread of a busy 2-core machine
    python -m labkit.shapes.qat --preset cpu --threads 1 --out runs/qat --export labkit/shapes/variants/qat

    # one GPU (an H100): a few minutes
    python -m labkit.shapes.qat --preset gpu --device cuda --out runs/qat-gpu \\
        --export labkit/shapes/variants/qat

How it works (torchao's QAT API, ``torchao.quantization.qat``):

1. load the shipped pipeline (``labkit/shapes/model``) and keep a frozen fp32 copy of its UNet, the
   *teacher*;
2. **prepare**: ``quantize_(unet, QATConfig(activation_config=..., weight_config=..., step="prepare"))``
   swaps every ``nn.Linear`` for a ``FakeQuantizedLinear`` that rounds its input (int8 per token) and
   its weight (int8 per output channel) as ``Int8DynamicActivationInt8WeightConfig`` will, in float
   arithmetic, with straight-through gradients (`labkit.quantization.prepare_qat`);
3. fine-tune **only the linear layers' weights and biases** (the only tensors int8 touches; the
   convolutions stay in float) on the training images: noisy latents at random timesteps, as the
   base model was trained, and as the target the fp32 teacher's prediction (the loss the quantized
   model can actually reach: the teacher's own error is not ours to fix) with the trainer's min-SNR-5
   weights; ``--target noise`` uses the true noise instead, the base training's loss;
4. **convert**: ``QATConfig(step="convert")`` swaps back to ``nn.Linear``, and the fine-tuned linear
   weights are stored (fp16, safetensors) in ``--export``: about a third of the UNet's bytes. The
   tier `labkit.tiers.int8_qat` loads them on top of the shipped UNet and applies the same int8
   quantization.

Data, batches, checkpoints (``OUT/checkpoints/qat.safetensors`` + ``.json``, every
``--checkpoint-minutes`` and on Ctrl-C or SIGTERM) and resume (run the same command again) are those
of :mod:`labkit.shapes.train`. Used in the INT8 chapter (``notebooks/07_quantization.ipynb``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import quantization
from . import MODEL_DIR, data
from .tokenizer import MAX_LENGTH
from .train import (
    _Clock,
    _load_checkpoint,
    _log,
    _sample_timesteps,
    _save_checkpoint,
    _snr_weight,
    encode_bank,
    make_bank,
    override,
    pick_device,
    run_job,
)

VARIANT_CONFIG = "config.json"
"""The variant's description (scheme, base fingerprint, training, scores) in the export folder."""


@dataclass
class QATConfig:
    """Everything a QAT run depends on; ``PRESETS`` holds the recipes."""

    out: str = "runs/qat"
    device: str = "auto"
    seed: int = 0
    scheme: str = "int8_dynamic"
    target: str = "teacher"
    bank_size: int = 4000
    steps: int = 1500
    minutes: float = 20.0
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 20
    snr_gamma: float = 5.0
    cfg_dropout: float = 0.1
    checkpoint_minutes: float = 2.0
    log_every: int = 20
    eval_n: int = 0
    progress: bool = True


PRESETS: dict[str, dict] = {
    # one (shared) CPU thread: a few minutes
    "cpu": {},
    # one data-centre GPU: a few minutes, bigger batches
    "gpu": dict(bank_size=20_000, steps=3000, minutes=4.0, batch_size=256, lr=2e-4, eval_n=500),
    # seconds, for tests and CI: a handful of steps on the shipped model
    "ci": dict(bank_size=16, steps=2, minutes=1.0, batch_size=4, warmup_steps=1, log_every=1),
}


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of a UNet's float weights: the QAT variant records its base's, and loads only on it."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def linear_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights and biases of the UNet's ``nn.Linear`` layers (the tensors QAT changes), by state-dict name."""
    names = quantization.linear_names(unet)
    return {
        f"{name}.{key}": tensor
        for name in names
        for key, tensor in unet.get_submodule(name).state_dict().items()
        if key in ("weight", "bias")
    }


def _trainable(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The linear layers' parameters (after prepare they are ``FakeQuantizedLinear``); the rest is frozen."""
    unet.requires_grad_(False)
    params = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            for key, p in module.named_parameters(recurse=False):
                p.requires_grad_(True)
                params[f"{name}.{key}"] = p
    return params


def load_base(device) -> tuple:
    """The shipped pipeline's UNet, VAE, text encoder, tokenizer and scheduler config (fp32, eval)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), use_safetensors=True)
    pipe.to(device)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


def train(cfg: QATConfig, export: str | None = None) -> dict:
    """Fine-tune the shipped UNet with fake quantization; write checkpoints, the variant and a summary."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    if cfg.scheme not in quantization.QAT_SCHEMES:
        raise ValueError(f"--scheme must be one of {quantization.QAT_SCHEMES}, not {cfg.scheme!r}")
    if cfg.target not in ("teacher", "noise"):
        raise ValueError(f"--target is 'teacher' or 'noise', not {cfg.target!r}")
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_base(device)
    fingerprint = unet_fingerprint(pipe.unet)
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    quantization.prepare_qat(student, cfg.scheme)
    params = _trainable(student)
    student.train()
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)

    bank, bank_prompts = make_bank(cfg.bank_size, cfg.seed, device)
    means, stds = encode_bank(pipe.vae, bank, device)
    scaling = float(pipe.vae.config.scaling_factor)
    prompts = data.all_prompts() + [""]
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    with torch.no_grad():
        contexts = pipe.text_encoder(ids)[0]
    empty = len(prompts) - 1
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type

    ckpt = out / "checkpoints" / "qat.safetensors"
    step, elapsed = 0, 0.0
    if ckpt.exists():
        meta = _load_checkpoint(ckpt, {"unet": student}, opt, None, device)
        if meta.get("base_fingerprint") != fingerprint or meta.get("scheme") != cfg.scheme:
            raise SystemExit(
                f"{ckpt} was trained on another base UNet or scheme; use another --out or --fresh"
            )
        step, elapsed = meta["step"], meta["elapsed"]
    clock = _Clock(elapsed, cfg.checkpoint_minutes)

    def save():
        meta = {
            "stage": "qat",
            "step": step,
            "elapsed": clock.elapsed,
            "scheme": cfg.scheme,
            "base_fingerprint": fingerprint,
            "config": asdict(cfg),
        }
        _save_checkpoint(ckpt, {"unet": student}, opt, None, meta)

    bar = tqdm(total=cfg.steps, initial=step, desc="qat", disable=not cfg.progress)
    losses: list[float] = []
    try:
        while step < cfg.steps and clock.elapsed < cfg.minutes * 60:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 700_000 + step)
            n = cfg.batch_size
            idx = torch.randint(0, len(bank), (n,), generator=g).to(device)
            eps = torch.randn(means[idx].shape, generator=g).to(device)
            latents = (means[idx] + stds[idx] * eps) * scaling
            noise = torch.randn(latents.shape, generator=g).to(device)
            timesteps = _sample_timesteps(n, noise_scheduler.config.num_train_timesteps, 0.0, g).to(device)
            drop = (torch.rand(n, generator=g) < cfg.cfg_dropout).to(device)
            prompt = torch.where(drop, torch.full_like(bank_prompts[idx], empty), bank_prompts[idx])
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            context = contexts[prompt]
            if cfg.target == "teacher":
                with torch.no_grad():
                    target = teacher(noisy, timesteps, context).sample
            elif prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            for group in opt.param_groups:  # warm-up, then cosine decay to 0 over the planned steps
                warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
                group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            pred = student(noisy, timesteps, context).sample
            loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            if cfg.snr_gamma > 0:
                loss = loss * _snr_weight(noise_scheduler, timesteps, cfg.snr_gamma, 0.0, prediction_type)
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}")
                record = {
                    "stage": "qat",
                    "step": step,
                    "loss": loss.item(),
                    "elapsed": round(clock.elapsed, 1),
                }
                _log(out, record)
            if clock.due():
                save()
    except KeyboardInterrupt:
        save()
        raise
    bar.close()
    save()

    quantization.convert_qat(student, None)  # FakeQuantizedLinear -> nn.Linear, float weights
    summary = {
        "scheme": cfg.scheme,
        "target": cfg.target,
        "steps": step,
        "minutes": round(clock.elapsed / 60, 2),
        "device": str(device),
        "base_fingerprint": fingerprint,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "config": asdict(cfg),
        "torch": torch.__version__,
    }
    save_variant(student, out / "variant", summary)
    if export:
        save_variant(student, Path(export), summary)
        summary["exported_to"] = str(export)
    if cfg.eval_n > 0:
        summary["eval"] = evaluate_variant(out / "variant", cfg.scheme, cfg.eval_n, str(device))
        _write_config(out / "variant", summary)
        if export:
            _write_config(Path(export), summary)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_config(folder: Path, summary: dict) -> None:
    """Write (or update) the variant's config: one entry per scheme, the base it was trained on."""
    path = folder / VARIANT_CONFIG
    config = json.loads(path.read_text()) if path.exists() else {"kind": "qat", "schemes": {}}
    entry = {k: v for k, v in summary.items() if k != "exported_to"}
    entry["weights"] = f"{summary['scheme']}.safetensors"
    config["schemes"][summary["scheme"]] = entry
    path.write_text(json.dumps(config, indent=2) + "\n")


def save_variant(unet: torch.nn.Module, folder: Path, summary: dict) -> Path:
    """Store the fine-tuned linear weights (fp16 safetensors) and the config in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in linear_state(unet).items()}
    path = folder / f"{summary['scheme']}.safetensors"
    save_file(tensors, str(path), metadata={"base_fingerprint": summary["base_fingerprint"]})
    _write_config(folder, summary)
    return path


def variant_problem(folder: Path, unet: torch.nn.Module, scheme: str) -> str | None:
    """Why the QAT weights in ``folder`` cannot be loaded on ``unet`` for ``scheme`` (None when they can)."""
    path = Path(folder) / VARIANT_CONFIG
    command = f"python -m labkit.shapes.qat --scheme {scheme} --export {folder}"
    if not path.exists():
        return f"no QAT weights in {folder}; train them with `{command}`"
    entry = json.loads(path.read_text())["schemes"].get(scheme)
    if entry is None:
        return f"no QAT weights for {scheme} in {folder}; train them with `{command}`"
    if entry["base_fingerprint"] != unet_fingerprint(unet):
        return (
            f"the QAT weights in {folder} were fine-tuned from another UNet (fingerprint "
            f"{entry['base_fingerprint']}); the shipped model changed since: retrain with `{command}`"
        )
    return None


def load_variant(unet: torch.nn.Module, folder: Path, scheme: str) -> int:
    """Load the QAT linear weights of ``scheme`` from ``folder`` into ``unet`` (in place); returns their count."""
    entry = json.loads((Path(folder) / VARIANT_CONFIG).read_text())["schemes"][scheme]
    tensors = load_file(str(Path(folder) / entry["weights"]))
    param = next(unet.parameters())
    tensors = {k: v.to(device=param.device, dtype=param.dtype) for k, v in tensors.items()}
    missing, unexpected = unet.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"QAT weights with names this UNet lacks: {unexpected[:3]}...")
    return len(tensors)


def evaluate_variant(folder: Path, scheme: str, n: int, device: str) -> dict:
    """Prompt accuracy, FID and same-seed PSNR of fp32, PTQ and QAT+``scheme`` (DPM-Solver++ 20)."""
    from .. import quality
    from ..models import load_pipeline
    from ..tier1 import use_sampler

    scores, reference = {}, None
    for label in ("fp32", "ptq", "qat"):
        pipe = load_pipeline("shapes", device=device)
        pipe.set_progress_bar_config(disable=True)
        use_sampler(pipe, "DPM++ 2M", 20)
        if label == "qat":
            load_variant(pipe.unet, folder, scheme)
        if label != "fp32":
            quantization.quantize_unet(pipe, scheme)
        result = quality.evaluate(pipe, n=n, steps=20, return_images=True)
        images = result.pop("images")
        reference = images if reference is None else reference
        scores[label] = {
            "prompt_accuracy": result["prompt_accuracy"],
            "fid": result["fid"],
            "psnr_vs_fp32": quality.psnr(reference, images),
        }
    return scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m labkit.shapes.qat",
        description="Fine-tune the shipped shapes UNet with fake quantization (torchao QAT).",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the defaults (cpu)")
    p.add_argument("--out", default=None, help="work folder: checkpoints/, variant/, logs (runs/qat)")
    p.add_argument("--export", default=None, help="also store the variant here (labkit/shapes/variants/qat)")
    p.add_argument("--scheme", choices=quantization.QAT_SCHEMES, default=None, help="int8_dynamic")
    p.add_argument("--target", choices=["teacher", "noise"], default=None, help="teacher (fp32 UNet)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="time budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--bank-size", type=int, default=None, help="training images drawn up front")
    p.add_argument("--checkpoint-minutes", type=float, default=None)
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts scored at the end (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, try 1)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> QATConfig:
    """A :class:`QATConfig` from the preset, overridden by the flags that were given."""
    cfg = QATConfig(**PRESETS[args.preset])
    names = (
        "out",
        "device",
        "seed",
        "scheme",
        "target",
        "steps",
        "minutes",
        "batch_size",
        "lr",
        "bank_size",
        "checkpoint_minutes",
        "eval_n",
    )
    return override(cfg, args, names)


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m labkit.shapes.qat``: parse the flags, fine-tune, print the summary."""
    args = build_parser().parse_args(argv)
    if (problem := quantization.torchao_problem()) is not None:
        print(f"QAT {problem}", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    return run_job(args, cfg.out, lambda: train(cfg, export=args.export))


if __name__ == "__main__":
    sys.exit(cli_main())
