"""Distil a smaller student UNet from the shapes teacher, in the BK-SDM manner (``labkit train student``).

BK-SDM ("block-removed knowledge-distilled Stable Diffusion", Kim et al., 2023) makes SD's UNet smaller by
*removing blocks* rather than by shrinking widths: the mid block goes, and one residual + attention pair
goes from each stage. The architecture is `labkit.optimizations.swaps.student_config` (the cut,
`labkit.optimizations.swaps.bk_layers`); here the student starts from the teacher's weights that remain
(`build_student`) and is trained with three losses (`distill_losses`):

- the **task loss** (the usual denoising loss against the true noise),
- the **output KD loss** (MSE between the student's and the teacher's predicted noise),
- the **feature KD loss** (MSE between the student's and the teacher's block outputs, summed over blocks).

The shapes teacher has one residual (+ attention) per down stage and two per up stage, 5 levels
16x16 -> 1x1 and a mid block. Its student: **no mid block**, as in BK-SDM-Small; **no down residual (+
attention) at 16x16, 4x4 and 1x1** (``layers_per_block=(0, 1, 0, 1, 0)``; in diffusers an up stage has
one more residual than its down stage, so this also removes one up residual (+ attention) at those three
levels); **the 1x1 level stays** (its up stage places the shapes). The result is a standard
``UNet2DConditionModel`` with 60% of the teacher's parameters, which the ``distilled_student``
optimization loads from ``labkit/shapes/variants/student``::

    # CPU, one thread, a time budget (the shipped student)
    labkit train student --preset cpu --threads 1 --minutes 62 --eval-n 0 --out runs/student \\
        --export labkit/shapes/variants/student

    # one GPU (an H100): a few minutes
    labkit train student --preset gpu --device cuda --out runs/student-gpu \\
        --export labkit/shapes/variants/student

Checkpoints, resume (run the same command again), the EMA and the image bank are those of every
denoising job (`labkit.training.jobs`). Used for the distillation chapter (9).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.models import load_pipeline
from labkit.optimizations import apply
from labkit.optimizations.swaps import student_config
from labkit.training.jobs import (
    EMA,
    DenoisingBatches,
    DiffusionConfig,
    Loop,
    autocast,
    encode_bank,
    encode_prompts,
    ints,
    make_bank,
    noise_scheduler,
    optimizer_step,
    per_example_mse,
    pick_device,
    quick_eval,
    set_lr,
    snr_weight,
    tokenize_prompts,
    trainer,
    warmup,
    write_summary,
)

COMMANDS = {
    "cpu": "labkit train student --preset cpu --threads 1 --minutes 62 --eval-n 0 --out runs/student "
    "--export labkit/shapes/variants/student",
    "gpu": "labkit train student --preset gpu --device cuda --out runs/student-gpu "
    "--export labkit/shapes/variants/student",
}
"""The commands that train the shipped student (the docstring above)."""

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StudentConfig(DiffusionConfig):
    """Everything a distillation run depends on. ``PRESETS`` holds the shipped recipes."""

    out: str = "runs/student"
    teacher: str = "shapes"  # a shapes pipeline: "shapes" (the shipped model) or a folder
    layers_per_block: tuple[int, ...] | None = None  # None: the BK-SDM cut of the teacher (bk_layers)
    mid_block: bool = False
    steps: int = 20_000
    minutes: float = 62.0
    lr: float = 5e-4
    task_weight: float = 1.0
    output_kd_weight: float = 1.0
    feature_kd_weight: float = 1.0
    ema_decay: float = 0.999


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
    # the ci profile and tests: a few steps (needs a teacher; tests pass a tiny one)
    "ci": dict(bank_size=64, steps=3, minutes=1.0, batch_size=8, warmup_steps=1, eval_n=0, log_every=1),
}

HELP = {
    "out": "work folder: checkpoints/, student/, logs",
    "teacher": "the teacher pipeline: shapes (the shipped model) or a folder",
    "layers_per_block": "residuals per down stage, e.g. 0,1,0,1,0 (default: the BK-SDM cut)",
    "mid_block": "keep the mid block (BK-SDM-Base) or not (BK-SDM-Small)",
    "task_weight": "weight of the denoising loss",
    "output_kd_weight": "weight of the output distillation loss",
    "feature_kd_weight": "weight of the feature distillation loss",
    "ema_decay": "EMA of the exported weights",
}


# ----------------------------------------------------------------------------------------------------------
# the student and its losses


def build_student(teacher, layers_per_block=None, mid_block: bool = False):
    """A student ``UNet2DConditionModel`` initialised from the teacher's weights that it keeps.

    Returns ``(student, copied)``: ``copied`` is the share of the student's parameters that came from the
    teacher (a parameter is copied when the teacher has one of the same name and shape; with the BK-SDM
    cut, every parameter is).
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
    task = per_example_mse(s_pred, target)
    out_kd = per_example_mse(s_pred, t_pred)
    feat_kd = torch.zeros_like(task)
    for n in names:
        s, t = s_feats.out[n].float(), t_feats.out[n].float()
        feat_kd = feat_kd + F.mse_loss(s, t, reduction="none").flatten(1).mean(dim=1)
    if weights is not None:
        task, out_kd, feat_kd = task * weights, out_kd * weights, feat_kd * weights
    return {"task": task, "out_kd": out_kd, "feat_kd": feat_kd}


# ----------------------------------------------------------------------------------------------------------
# training


def load_teacher(source: str, device):
    """The teacher pipeline (fp32), every part frozen: ``"shapes"`` or a shapes pipeline folder."""
    pipe = load_pipeline(source or "shapes", device=device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe


def distill(cfg: StudentConfig, export: str | None = None, export_dtype: str = "float16") -> dict:
    """Train the student (resumes from ``OUT/checkpoints/student.safetensors``); save its EMA weights to
    ``OUT/student`` (and ``export``, in ``export_dtype``) at every checkpoint; returns a summary."""
    from labkit.shapes.build import count_parameters  # diffusers: loaded when a job runs

    if export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {export_dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher_pipe = load_teacher(cfg.teacher, device)
    teacher = teacher_pipe.unet
    scheduler = noise_scheduler(teacher_pipe.scheduler.config)
    torch.manual_seed(cfg.seed + 2)
    student, copied = build_student(teacher, cfg.layers_per_block, cfg.mid_block)
    student.train()
    named = dict(student.named_parameters())
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = EMA({f"unet.{k}": p for k, p in named.items()}, cfg.ema_decay)

    bank, bank_prompts = make_bank(cfg.bank_size, cfg.seed, device)
    means, stds = encode_bank(teacher_pipe.vae, bank, device)
    scaling_factor = float(teacher_pipe.vae.config.scaling_factor)
    contexts = encode_prompts(teacher_pipe.text_encoder, tokenize_prompts(teacher_pipe.tokenizer, device))
    batches = DenoisingBatches(
        means, stds, bank_prompts, scaling_factor, scheduler,
        seed=cfg.seed, stream=700_000, cfg_dropout=cfg.cfg_dropout,
    )  # fmt: skip
    parameters = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
    loop = Loop("student", cfg, {"unet": student}, opt, device, ema=ema)

    def save(meta: dict) -> None:
        info = {
            "steps": meta["step"],
            "minutes": round(meta["elapsed"] / 60, 2),
            "teacher": cfg.teacher,
            "parameters": parameters,
            "initialised_from_teacher": round(copied, 4),
            "last_losses": {k: round(v, 5) for k, v in loop.last.items()},
            "device": str(device),
            "config": cfg.to_dict(),
            "torch": torch.__version__,
        }
        export_student(student, ema, out / "student", info, dtype="float32")
        if export:
            export_student(student, ema, Path(export), info, dtype=export_dtype)

    loop.on_save.append(save)

    def train_step(step: int) -> dict:
        batch = batches(step, cfg.batch_size)
        weights = snr_weight(scheduler, batch.timesteps, cfg.snr_gamma) if cfg.snr_gamma > 0 else None
        set_lr(opt, cfg.lr * warmup(step, cfg.warmup_steps))
        with autocast(device):
            losses = distill_losses(
                student, teacher, batch.noisy, batch.timesteps, contexts[batch.prompts], batch.target, weights
            )
        losses = {k: v.mean() for k, v in losses.items()}
        loss = (
            cfg.task_weight * losses["task"]
            + cfg.output_kd_weight * losses["out_kd"]
            + cfg.feature_kd_weight * losses["feat_kd"]
        )
        optimizer_step(opt, loss, params)
        ema.update(step)
        return losses

    loop.run(train_step)
    summary = {
        "device": str(device),
        "steps": loop.step,
        "minutes": round(loop.clock.elapsed / 60, 2),
        "parameters": parameters,
        "initialised_from_teacher": round(copied, 4),
        "last_losses": {k: round(v, 5) for k, v in loop.last.items()},
    }
    if cfg.eval_n > 0:
        pipe = load_teacher(cfg.teacher, device)
        apply(pipe, [("distilled_student", {"unet": str(out / "student")})])
        summary["eval"] = quick_eval(pipe, cfg.eval_n)
    return write_summary(out, summary, start)


def export_student(student, ema: EMA, folder: Path, info: dict, dtype: str = "float32") -> None:
    """Save the student with its EMA weights (config.json + safetensors, in ``dtype``) and ``distill.json``."""
    unet = copy.deepcopy(student).float().cpu()
    unet.load_state_dict({k: v.cpu() for k, v in ema.part("unet").items()}, strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    unet.to(EXPORT_DTYPES[dtype]).save_pretrained(str(folder), safe_serialization=True)
    (folder / "distill.json").write_text(json.dumps(dict(info, stored_dtype=dtype), indent=2) + "\n")


TRAINER = trainer(
    "a BK-SDM-style student UNet distilled from the shapes model",
    StudentConfig,
    PRESETS,
    lambda cfg, args: distill(cfg, export=args.export, export_dtype=args.export_dtype),
    export="also save the student here, e.g. labkit/shapes/variants/student",
    more_arguments=lambda parser: parser.add_argument(
        "--export-dtype",
        choices=list(EXPORT_DTYPES),
        default="float16",
        help="dtype of the exported weights (float16)",
    ),
    texts=HELP,
    types={"layers_per_block": ints},
)
