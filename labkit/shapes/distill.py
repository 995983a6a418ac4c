"""Distil a smaller student UNet from the shapes teacher, in the BK-SDM manner (Kim et al., 2023).

BK-SDM ("block-removed knowledge-distilled Stable Diffusion") makes SD's UNet smaller by *removing blocks*
rather than by shrinking widths: the mid block goes, and one residual + attention pair goes from each
stage. The student starts from the teacher's weights that remain, and is trained with three losses:

- the **task loss** (the usual denoising loss against the true noise),
- the **output KD loss** (MSE between the student's and the teacher's predicted noise),
- the **feature KD loss** (MSE between the student's and the teacher's block outputs, summed over blocks).

The shapes teacher (:mod:`labkit.shapes.build`) has one residual (+ attention) per down stage and two per
up stage, 5 levels 16x16 -> 1x1 and a mid block. Its student here:

- **no mid block** (``mid_block_type=None``), as in BK-SDM-Small;
- **no down residual (+ attention) at 16x16, 4x4 and 1x1** (``layers_per_block=(0, 1, 0, 1, 0)``):
  in diffusers an up stage has one more residual than its down stage, so this also removes one up
  residual (+ attention) at those three levels, BK-SDM's "one pair per stage" on alternate stages. A stage
  can lose its down residual only where it does not change the width (16x16: 32 -> 32, 4x4: 64 -> 64,
  1x1: 96 -> 96); the others (32 -> 64, 64 -> 96) keep theirs.
- **the 1x1 level stays**: its up stage (a residual + cross-attention to the prompt) is what places the
  shapes (see :func:`labkit.shapes.build.build_unet`).

The result is a standard ``UNet2DConditionModel`` (``tiers.distilled_student`` loads it from a folder) with
60% of the teacher's parameters. One command trains it (``python -m labkit.shapes.distill``)::

    # CPU, one thread, a time budget (the shipped student)
    python -m labkit.shapes.distill --preset cpu --threads 1 --minutes 62 --eval-n 0 \\
        --out runs/student --export labkit/shapes/variants/student

    # one GPU (an H100): a few minutes
    python -m labkit.shapes.distill --preset gpu --device cuda --out runs/student-gpu \\
        --export labkit/shapes/variants/student

Checkpoints, resume (run the same command again), the EMA and the image bank are those of
:mod:`labkit.shapes.train`. Used in the distillation chapter (notebooks/09_distillation.ipynb).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .build import count_parameters
from .tokenizer import MAX_LENGTH
from .train import (
    _autocast,
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

#: the commands that train the shipped student (the docstring above)
COMMANDS = {
    "cpu": "python -m labkit.shapes.distill --preset cpu --threads 1 --minutes 62 --eval-n 0 "
    "--out runs/student --export labkit/shapes/variants/student",
    "gpu": "python -m labkit.shapes.distill --preset gpu --device cuda --out runs/student-gpu "
    "--export labkit/shapes/variants/student",
}

#: the BK-SDM-style cut of the shipped teacher (see the module docstring; :func:`bk_layers` of it)
STUDENT_LAYERS = (0, 1, 0, 1, 0)


def bk_layers(config: dict) -> list[int]:
    """Residuals (+ attentions) per down stage after BK-SDM's cut: one fewer per stage.

    A stage may drop to 0 only where it keeps its width (a residual is what changes the width): SD 1.5
    (2 per stage) becomes 1 per stage, as in BK-SDM; a 1-per-stage UNet such as the shapes teacher loses
    the residual of the stages that keep their width (``(0, 1, 0, 1, 0)``).
    """
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    cut = []
    for i, n in enumerate(layers):
        keeps_width = channels[max(i - 1, 0)] == channels[i]
        cut.append(max(n - 1, 0 if keeps_width else 1))
    return cut


@dataclass
class DistillConfig:
    """Everything a distillation run depends on. ``PRESETS`` holds the shipped recipes."""

    out: str = "runs/student"
    teacher: str = ""  # a shapes pipeline folder; "" = the shipped model (labkit/shapes/model)
    device: str = "auto"
    seed: int = 0
    layers_per_block: tuple[int, ...] | None = None  # None: the BK-SDM cut of the teacher (bk_layers)
    mid_block: bool = False
    bank_size: int = 20_000
    steps: int = 20_000
    minutes: float = 62.0
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    task_weight: float = 1.0
    output_kd_weight: float = 1.0
    feature_kd_weight: float = 1.0
    snr_gamma: float = 5.0
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_minutes: float = 2.0
    log_every: int = 20
    eval_n: int = 200
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.layers_per_block is not None:
            d["layers_per_block"] = list(self.layers_per_block)
        return d


PRESETS: dict[str, dict] = {
    # the shipped student: a time budget on one (shared) CPU thread
    "cpu": {},
    # one data-centre GPU: a few minutes (bf16 autocast)
    "gpu": dict(
        bank_size=60_000,
        steps=20_000,
        minutes=5.0,
        batch_size=256,
        lr=1e-3,
        warmup_steps=300,
        ema_decay=0.9995,
        eval_n=500,
    ),
    # the ci profile / tests: a few steps (needs a teacher; tests pass a tiny one)
    "ci": dict(bank_size=64, steps=3, minutes=1.0, batch_size=8, warmup_steps=1, eval_n=0, log_every=1),
}


# ----------------------------------------------------------------------------------------------------------
# the student's architecture and its initialisation


def student_config(teacher_config: dict, layers_per_block=None, mid_block: bool = False) -> dict:
    """The ``UNet2DConditionModel`` config of a BK-SDM-style student of ``teacher_config``.

    ``layers_per_block``: residuals (+ attentions) per down stage (each up stage gets one more; default
    :func:`bk_layers`); ``mid_block=False`` removes the mid block. A 0 is only possible where the stage
    keeps its width.
    """
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    channels = list(config["block_out_channels"])
    if layers_per_block is None:
        layers_per_block = bk_layers(config)
    layers = [int(n) for n in layers_per_block]
    if len(layers) != len(channels):
        raise ValueError(
            f"layers_per_block has {len(layers)} entries but the teacher has {len(channels)} stages "
            f"({channels}); give one count per stage, e.g. {STUDENT_LAYERS}"
        )
    for i, n in enumerate(layers):
        width_in = channels[max(i - 1, 0)]
        if n < 0:
            raise ValueError(f"layers_per_block[{i}] = {n}: a count of residuals must be >= 0")
        if n == 0 and width_in != channels[i]:
            raise ValueError(
                f"stage {i} goes from {width_in} to {channels[i]} channels: only a residual can change the "
                "width, so it must keep at least 1 (layers_per_block entry 0 is for stages that keep "
                "their width)"
            )
    config["layers_per_block"] = layers
    if not mid_block:
        config["mid_block_type"] = None
    return config


def build_student(teacher, layers_per_block=None, mid_block: bool = False):
    """A student ``UNet2DConditionModel`` initialised from the teacher's weights that it keeps.

    Returns ``(student, copied)``: ``copied`` is the share of the student's parameters that came from the
    teacher (a parameter is copied when the teacher has one of the same name and shape; with the cut above,
    every parameter is).
    """
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel(**student_config(teacher.config, layers_per_block, mid_block))
    source = teacher.state_dict()
    target = student.state_dict()
    copied = 0
    for name, value in target.items():
        if name in source and source[name].shape == value.shape:
            target[name] = source[name].detach().clone().to(value.dtype)
            copied += value.numel()
    student.load_state_dict(target)
    total = sum(v.numel() for v in target.values())
    return student.to(teacher.device), copied / max(total, 1)


def feature_blocks(unet) -> dict[str, torch.nn.Module]:
    """The blocks whose outputs the feature KD loss matches: every up stage and every down stage that
    still has a residual (a down stage with none only downsamples; BK-SDM matches stage outputs)."""
    blocks = {}
    for i, block in enumerate(unet.down_blocks):
        if len(block.resnets) > 0:
            blocks[f"down.{i}"] = block
    for i, block in enumerate(unet.up_blocks):
        blocks[f"up.{i}"] = block
    return blocks


class _Features:
    """Forward hooks that keep each named block's output (the hidden states, not the skips)."""

    def __init__(self, blocks: dict[str, torch.nn.Module]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [b.register_forward_hook(self._hook(n)) for n, b in blocks.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distill_losses(
    student, teacher, noisy, timesteps, context, target, weights=None
) -> dict[str, torch.Tensor]:
    """The three BK-SDM losses for one batch, per example (shape ``(n,)``): ``task``, ``out_kd``,
    ``feat_kd``. ``weights`` (per example, e.g. min-SNR) multiplies all three."""
    names = list(feature_blocks(student))
    teacher_blocks = {n: b for n, b in feature_blocks(teacher).items() if n in names}
    names = [n for n in names if n in teacher_blocks]
    t_feats = _Features(teacher_blocks)
    s_feats = _Features({n: feature_blocks(student)[n] for n in names})
    try:
        with torch.no_grad():
            t_pred = teacher(noisy, timesteps, context).sample.float()
        s_pred = student(noisy, timesteps, context).sample.float()
    finally:
        t_feats.remove()
        s_feats.remove()
    task = F.mse_loss(s_pred, target, reduction="none").mean(dim=(1, 2, 3))
    out_kd = F.mse_loss(s_pred, t_pred, reduction="none").mean(dim=(1, 2, 3))
    feat_kd = torch.zeros_like(task)
    for n in names:
        s, t = s_feats.out[n].float(), t_feats.out[n].float()
        feat_kd = feat_kd + F.mse_loss(s, t, reduction="none").flatten(1).mean(dim=1)
    if weights is not None:
        task, out_kd, feat_kd = task * weights, out_kd * weights, feat_kd * weights
    return {"task": task, "out_kd": out_kd, "feat_kd": feat_kd}


# ----------------------------------------------------------------------------------------------------------
# training


def load_teacher(folder: str | Path, device):
    """The teacher's pipeline parts (fp32): unet, vae, text encoder, tokenizer, scheduler config."""
    from diffusers import StableDiffusionPipeline

    from . import MODEL_DIR

    folder = Path(folder) if folder else MODEL_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"teacher {folder}: no model_index.json; give a shapes pipeline folder such as "
            "labkit/shapes/model (or runs/shapes/model from labkit train-shapes)"
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe


def distill(cfg: DistillConfig, export: str | None = None, export_dtype: str = "float16") -> dict:
    """Train the student (resumes from ``OUT/checkpoints/student.safetensors``); save its EMA weights to
    ``OUT/student`` (and ``export``); returns a summary. Used in the distillation chapter."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher_pipe = load_teacher(cfg.teacher, device)
    teacher = teacher_pipe.unet
    sched_cfg = teacher_pipe.scheduler.config
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=sched_cfg.get("num_train_timesteps", 1000),
        beta_start=sched_cfg.get("beta_start", 0.00085),
        beta_end=sched_cfg.get("beta_end", 0.012),
        beta_schedule=sched_cfg.get("beta_schedule", "scaled_linear"),
        prediction_type=prediction_type,
        rescale_betas_zero_snr=sched_cfg.get("rescale_betas_zero_snr", False),
    )
    torch.manual_seed(cfg.seed + 2)
    student, copied = build_student(teacher, cfg.layers_per_block, cfg.mid_block)
    student.train()
    named = dict(student.named_parameters())
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = {f"unet.{k}": p.detach().clone().float() for k, p in named.items()}
    ema_values = list(ema.values())

    bank, bank_prompts = make_bank(cfg.bank_size, cfg.seed, device)
    means, stds = encode_bank(teacher_pipe.vae, bank, device)
    scaling_factor = float(teacher_pipe.vae.config.scaling_factor)
    prompts = data.all_prompts() + [""]
    ids = teacher_pipe.tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():  # the text encoder is frozen: encode the 271 prompts once
        contexts = teacher_pipe.text_encoder(ids.input_ids.to(device))[0]
    empty = len(prompts) - 1

    ckpt = out / "checkpoints" / "student.safetensors"
    step, elapsed = 0, 0.0
    if ckpt.exists():
        meta = _load_checkpoint(ckpt, {"unet": student}, opt, ema, device)
        step, elapsed = meta["step"], meta["elapsed"]
    clock = _Clock(elapsed, cfg.checkpoint_minutes)
    last: dict[str, float] = {}

    def save():
        meta = {"stage": "student", "step": step, "elapsed": clock.elapsed, "config": cfg.to_dict()}
        _save_checkpoint(ckpt, {"unet": student}, opt, ema, meta)
        info = {
            "steps": step,
            "minutes": round(clock.elapsed / 60, 2),
            "teacher": str(cfg.teacher or "labkit/shapes/model"),
            "parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
            "initialised_from_teacher": round(copied, 4),
            "last_losses": last,
            "device": str(device),
            "config": cfg.to_dict(),
            "torch": torch.__version__,
        }
        export_student(student, ema, out / "student", info, dtype="float32")
        if export:
            export_student(student, ema, Path(export), info, dtype=export_dtype)

    budget = cfg.minutes * 60
    bar = tqdm(total=cfg.steps, initial=step, desc="student", disable=not cfg.progress)
    try:
        while step < cfg.steps and clock.elapsed < budget:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 700_000 + step)
            n = cfg.batch_size
            idx = torch.randint(0, len(bank), (n,), generator=g).to(device)
            eps = torch.randn(means[idx].shape, generator=g).to(device)
            latents = (means[idx] + stds[idx] * eps) * scaling_factor
            noise = torch.randn(latents.shape, generator=g).to(device)
            timesteps = _sample_timesteps(n, noise_scheduler.config.num_train_timesteps, 0.0, g).to(device)
            drop = (torch.rand(n, generator=g) < cfg.cfg_dropout).to(device)
            prompt = torch.where(drop, torch.full_like(bank_prompts[idx], empty), bank_prompts[idx])
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            weights = None
            if cfg.snr_gamma > 0:
                weights = _snr_weight(noise_scheduler, timesteps, cfg.snr_gamma, 0.0, prediction_type)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            with _autocast(device):
                losses = distill_losses(student, teacher, noisy, timesteps, contexts[prompt], target, weights)
            losses = {k: v.mean() for k, v in losses.items()}
            loss = (
                cfg.task_weight * losses["task"]
                + cfg.output_kd_weight * losses["out_kd"]
                + cfg.feature_kd_weight * losses["feat_kd"]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_values, [p.detach().float() for p in params], 1 - decay)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                last = {k: round(v.item(), 5) for k, v in losses.items()}
                bar.set_postfix(**{k: f"{v:.4f}" for k, v in last.items()})
                _log(out, {"stage": "student", "step": step, **last, "elapsed": round(clock.elapsed, 1)})
            if clock.due():
                save()
    except KeyboardInterrupt:
        save()
        raise
    bar.close()
    save()
    summary = {
        "device": str(device),
        "steps": step,
        "minutes": round(clock.elapsed / 60, 2),
        "parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
        "initialised_from_teacher": round(copied, 4),
        "last_losses": last,
    }
    if cfg.eval_n > 0:
        summary["eval"] = quick_eval(out / "student", cfg.eval_n, device, cfg.teacher)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export_student(student, ema: dict, folder: Path, info: dict, dtype: str = "float32") -> None:
    """Save the student with its EMA weights (config.json + safetensors, in ``dtype``) and ``distill.json``."""
    import copy

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"export dtype {dtype!r}: choose from {', '.join(dtypes)}")
    unet = copy.deepcopy(student).float().cpu()
    unet.load_state_dict({k[5:]: v.cpu() for k, v in ema.items() if k.startswith("unet.")}, strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    unet.to(dtypes[dtype]).save_pretrained(str(folder), safe_serialization=True)
    (folder / "distill.json").write_text(json.dumps(dict(info, stored_dtype=dtype), indent=2) + "\n")


def quick_eval(student_dir: Path, n: int, device, teacher: str = "") -> dict:
    """Prompt accuracy and FID of the teacher pipeline with the student UNet (DPM-Solver++, 20 steps)."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    from .. import quality
    from . import CLASSIFIER_PATH

    if not CLASSIFIER_PATH.exists():
        return {"skipped": "no classifier; run `labkit train-shapes --stages classifier`"}
    pipe = load_teacher(teacher, device)
    pipe.unet = UNet2DConditionModel.from_pretrained(str(student_dir)).to(device).float()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = quality.evaluate(pipe, n=n)
    return {k: v for k, v in result.items() if k != "images"}


# ----------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m labkit.shapes.distill",
        description="Distil a BK-SDM-style student UNet from the shapes teacher.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the defaults below (cpu)")
    p.add_argument("--out", default=None, help="work folder: checkpoints/, student/, logs (runs/student)")
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (the shipped shapes model)")
    p.add_argument(
        "--export", default=None, help="also save the student here (labkit/shapes/variants/student)"
    )
    p.add_argument("--export-dtype", default="float16", help="dtype of the exported weights (float16)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--layers-per-block", default=None, help=f"per stage, e.g. {','.join(map(str, STUDENT_LAYERS))}"
    )
    p.add_argument("--mid-block", action="store_true", default=None, help="keep the mid block")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="time budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--bank-size", type=int, default=None)
    p.add_argument("--output-kd-weight", type=float, default=None)
    p.add_argument("--feature-kd-weight", type=float, default=None)
    p.add_argument("--task-weight", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--checkpoint-minutes", type=float, default=None)
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts scored at the end (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, try 1)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """A :class:`DistillConfig` from the preset, overridden by the flags that were given."""
    cfg = DistillConfig(**PRESETS[args.preset])
    names = (
        "out", "teacher", "device", "seed", "mid_block", "steps", "minutes", "batch_size", "lr",
        "bank_size", "output_kd_weight", "feature_kd_weight", "task_weight", "ema_decay",
        "checkpoint_minutes", "eval_n",
    )  # fmt: skip
    override(cfg, args, names)
    if args.layers_per_block:
        try:
            cfg.layers_per_block = tuple(int(x) for x in args.layers_per_block.split(","))
        except ValueError as error:
            raise SystemExit(
                f"--layers-per-block {args.layers_per_block!r}: give integers like 0,1,0,1,0"
            ) from error
    return cfg


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m labkit.shapes.distill``: parse the flags, distil, print the summary."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    return run_job(args, cfg.out, lambda: distill(cfg, export=args.export, export_dtype=args.export_dtype))


if __name__ == "__main__":
    sys.exit(cli_main())
