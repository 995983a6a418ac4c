"""Quantization-aware training (QAT) of the shipped shapes UNet with torchao (``labkit train qat``)::

    # CPU (the shipped variant): a few minutes on 1 thread of a busy 2-core machine
    labkit train qat --preset cpu --threads 1 --out runs/qat --export labkit/shapes/variants/qat

    # one GPU (an H100): a few minutes
    labkit train qat --preset gpu --device cuda --out runs/qat-gpu --export labkit/shapes/variants/qat

How it works (torchao's QAT API, ``torchao.quantization.qat``):

1. load the shipped pipeline (``labkit/shapes/model``) and keep a frozen fp32 copy of its UNet, the
   *teacher*;
2. **prepare** (`labkit.optimizations.quantize.prepare_qat`): every ``nn.Linear`` becomes a
   ``FakeQuantizedLinear`` that rounds its input (int8 per token) and its weight (int8 per output
   channel) as ``Int8DynamicActivationInt8WeightConfig`` will, in float arithmetic, with
   straight-through gradients;
3. fine-tune **only the linear layers' weights and biases** (the only tensors int8 touches; the
   convolutions stay in float) on the training images: noisy latents at random timesteps, as the base
   model was trained, and as the target the fp32 teacher's prediction (the loss the quantized model can
   actually reach: the teacher's own error is not ours to fix) with min-SNR-5 weights; ``--target
   noise`` uses the true noise instead, the base training's loss;
4. **convert** (`labkit.optimizations.quantize.convert_qat`): back to ``nn.Linear``, and the fine-tuned
   linear weights are stored (fp16, safetensors) in ``--export``: about a third of the UNet's bytes. The
   ``int8_qat`` optimization loads them on top of the shipped UNet (only on the UNet whose fingerprint
   they record) and applies the same int8 quantization.

Data, batches, checkpoints (``OUT/checkpoints/qat.safetensors`` + ``.json``, every
``--checkpoint-minutes`` and on Ctrl-C or SIGTERM) and resume (run the same command again) are those of
every denoising job (`labkit.training.jobs`). Used for the INT8 chapter (7).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from labkit.models import load_pipeline
from labkit.optimizations import apply, missing
from labkit.optimizations.quantize import (
    QAT_SCHEMES,
    VARIANT_CONFIG,
    convert_qat,
    linear_state,
    load_variant,
    prepare_qat,
    unet_fingerprint,
)
from labkit.optimizations.samplers import use_sampler
from labkit.quality import evaluate, psnr
from labkit.training.jobs import (
    DenoisingBatches,
    DiffusionConfig,
    Loop,
    encode_bank,
    encode_prompts,
    make_bank,
    noise_scheduler,
    optimizer_step,
    per_example_mse,
    pick_device,
    set_lr,
    snr_weight,
    tokenize_prompts,
    trainer,
    warmup,
    write_summary,
)

TARGETS = ("teacher", "noise")


@dataclass
class QATConfig(DiffusionConfig):
    """Everything a QAT run depends on; ``PRESETS`` holds the recipes."""

    out: str = "runs/qat"
    scheme: str = "int8_dynamic"
    target: str = "teacher"
    bank_size: int = 4000
    steps: int = 1500
    minutes: float = 20.0
    lr: float = 1e-4
    warmup_steps: int = 20
    eval_n: int = 0


PRESETS: dict[str, dict] = {
    # one (shared) CPU thread: a few minutes
    "cpu": {},
    # one data-centre GPU: a few minutes, bigger batches
    "gpu": dict(bank_size=20_000, steps=3000, minutes=4.0, batch_size=256, lr=2e-4, eval_n=500),
    # seconds, for tests and CI: a handful of steps on the shipped model
    "ci": dict(bank_size=16, steps=2, minutes=1.0, batch_size=4, warmup_steps=1, log_every=1),
}

HELP = {
    "out": "work folder: checkpoints/, variant/, logs",
    "scheme": "the int8 setting to train for",
    "target": "teacher (the fp32 UNet's prediction) or noise (the base training's loss)",
    "lr": "learning rate (warm-up, then cosine decay to 0)",
    "eval_n": "held-out prompts scored at the end for fp32, PTQ and QAT (0: skip)",
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


def train(cfg: QATConfig, export: str | None = None) -> dict:
    """Fine-tune the shipped UNet with fake quantization; write checkpoints, the variant and a summary."""
    if cfg.scheme not in QAT_SCHEMES:
        raise ValueError(f"--scheme must be one of {', '.join(QAT_SCHEMES)}, not {cfg.scheme!r}")
    if cfg.target not in TARGETS:
        raise ValueError(f"--target is 'teacher' or 'noise', not {cfg.target!r}")
    if (problem := missing("torchao")) is not None:
        raise ValueError(f"QAT {problem}")
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_pipeline("shapes", device=device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    fingerprint = unet_fingerprint(pipe.unet)
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    prepare_qat(student, cfg.scheme)
    params = list(_trainable(student).values())
    student.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    bank, bank_prompts = make_bank(cfg.bank_size, cfg.seed, device)
    means, stds = encode_bank(pipe.vae, bank, device)
    contexts = encode_prompts(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, device))
    scheduler = noise_scheduler(pipe.scheduler.config)
    batches = DenoisingBatches(
        means, stds, bank_prompts, float(pipe.vae.config.scaling_factor), scheduler,
        seed=cfg.seed, stream=700_000, cfg_dropout=cfg.cfg_dropout,
    )  # fmt: skip

    meta = {"scheme": cfg.scheme, "base_fingerprint": fingerprint}
    loop = Loop("qat", cfg, {"unet": student}, opt, device, meta=meta)
    if loop.resumed and any(loop.resumed.get(k) != v for k, v in meta.items()):
        raise ValueError(
            f"{loop.checkpoint} was trained on another base UNet or scheme; use another --out or --fresh"
        )
    losses: list[float] = []

    def train_step(step: int) -> dict:
        batch = batches(step, cfg.batch_size)
        context = contexts[batch.prompts]
        target = batch.target
        if cfg.target == "teacher":
            with torch.no_grad():
                target = teacher(batch.noisy, batch.timesteps, context).sample
        # warm-up, then cosine decay to 0 over the planned steps
        set_lr(
            opt, cfg.lr * warmup(step, cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        )
        pred = student(batch.noisy, batch.timesteps, context).sample
        loss = per_example_mse(pred, target)
        if cfg.snr_gamma > 0:
            loss = loss * snr_weight(scheduler, batch.timesteps, cfg.snr_gamma)
        loss = loss.mean()
        optimizer_step(opt, loss, params)
        losses.append(loss.item())
        return {"loss": loss}

    loop.run(train_step)

    convert_qat(student, None)  # FakeQuantizedLinear -> nn.Linear, float weights
    summary = {
        "scheme": cfg.scheme,
        "target": cfg.target,
        "steps": loop.step,
        "minutes": round(loop.clock.elapsed / 60, 2),
        "device": str(device),
        "base_fingerprint": fingerprint,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "config": cfg.to_dict(),
        "torch": torch.__version__,
    }
    save_variant(student, out / "variant", summary)
    if export:
        save_variant(student, Path(export), summary)
        summary["exported_to"] = str(export)
    if cfg.eval_n > 0:
        summary["eval"] = evaluate_variant(out / "variant", cfg.scheme, cfg.eval_n, str(device))
        write_variant_config(out / "variant", summary)
        if export:
            write_variant_config(Path(export), summary)
    return write_summary(out, summary, start)


def write_variant_config(folder: Path, summary: dict) -> None:
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
    write_variant_config(folder, summary)
    return path


def evaluate_variant(folder: Path, scheme: str, n: int, device: str) -> dict:
    """Prompt accuracy, FID and same-seed PSNR of fp32, PTQ and QAT+``scheme`` (DPM-Solver++ 20)."""
    scores, reference = {}, None
    for label in ("fp32", "ptq", "qat"):
        pipe = load_pipeline("shapes", device=device)
        pipe.set_progress_bar_config(disable=True)
        use_sampler(pipe, "DPM++ 2M", 20)
        if label == "qat":
            load_variant(pipe.unet, folder, scheme)
        if label != "fp32":
            (change,) = apply(pipe, [scheme])
            if change.status != "applied":
                raise ValueError(f"{scheme}: {change.what}")
        result = evaluate(pipe, n=n, steps=20, return_images=True)
        images = result.pop("images")
        reference = images if reference is None else reference
        scores[label] = {
            "prompt_accuracy": result["prompt_accuracy"],
            "fid": result["fid"],
            "psnr_vs_fp32": psnr(reference, images),
        }
    return scores


TRAINER = trainer(
    "quantization-aware training of the shapes UNet's linear layers (torchao)",
    QATConfig,
    PRESETS,
    lambda cfg, args: train(cfg, export=args.export),
    export="also store the variant here, e.g. labkit/shapes/variants/qat",
    texts=HELP,
    choices={"scheme": QAT_SCHEMES, "target": TARGETS},
)
