"""Train the shapes classifier behind `labkit.quality` (``labkit train classifier``)::

    # the shipped classifier (about 7 minutes on a busy 2-core CPU)
    labkit train classifier --out runs/classifier --export labkit/shapes

`labkit.quality.ShapesClassifier` (four stride-2 convolutions, a 128-d embedding, one head per attribute)
learns from fresh procedural batches (``--batch-size`` images a step, each step its own seed) with the
nuisances a generated image may show and the labels ignore (blur, noise, a little contrast change);
AdamW with a one-cycle learning rate. It is saved as ``classifier.safetensors`` + ``classifier.json``
(its sizes and its held-out accuracy per attribute on ``--eval-n`` test-split images) in ``OUT`` and in
``--export``; `labkit.quality.load_classifier` reads them from ``labkit/shapes``.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from labkit.quality import ShapesClassifier, attribute_accuracy_with, to_tensor
from labkit.shapes import CLASSIFIER_PATH, data
from labkit.training.jobs import (
    Loop,
    TrainConfig,
    optimizer_step,
    pick_device,
    trainer,
    write_summary,
)


@dataclass
class ClassifierConfig(TrainConfig):
    """Everything a classifier training run depends on. ``PRESETS`` holds the recipes."""

    out: str = "runs/classifier"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    eval_n: int = 4000


PRESETS: dict[str, dict] = {
    # the shipped classifier: a few minutes on a CPU
    "cpu": {},
    # seconds, for tests and CI
    "ci": dict(steps=5, batch_size=8, eval_n=50, log_every=1),
}

HELP = {
    "out": "work folder: checkpoints/, the classifier, logs",
    "lr": "peak learning rate (one cycle: 10% warm-up, then cosine decay)",
    "eval_n": "held-out images whose attributes are checked at the end (0: skip)",
}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Nuisances a generated image may show and the labels ignore: blur, noise, a little contrast change."""
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float()
    x = use_blur * blurred + (1 - use_blur) * x
    gain = 1.0 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    noise = 0.04 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return (x * gain + noise).clamp(0, 1)


def train_classifier(cfg: ClassifierConfig, export: str | None = None) -> dict:
    """Train the classifier, save it to ``OUT`` (and ``export``); returns the summary with the held-out
    accuracy per attribute."""
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = ShapesClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed)  # the augmentations' draws: saved with each checkpoint
    loop = Loop("classifier", cfg, {"classifier": model}, opt, device, generators={"augment": g})
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    with warnings.catch_warnings():  # a resumed run: bring the schedule (it depends on the step only) along
        warnings.simplefilter("ignore")
        for _ in range(loop.step):
            sched.step()

    def train_step(step: int) -> dict:
        batch = data.sample(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, split="train")
        x = _augment(to_tensor(batch.images), g).to(device)
        logits = model(x)
        loss = sum(
            F.cross_entropy(logits[k], torch.from_numpy(v).to(device)) for k, v in batch.labels.items()
        )
        optimizer_step(opt, loss, model.parameters(), max_norm=None)
        sched.step()
        return {"loss": loss}

    loop.run(train_step)
    model.eval()
    accuracy = None
    if cfg.eval_n > 0:
        test = data.sample(cfg.eval_n, seed=cfg.seed + 12345, split="test")
        accuracy = attribute_accuracy_with(model, test.images, test.labels)
    path = out / CLASSIFIER_PATH.name
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    info = dict(
        model.config, heldout_accuracy=accuracy, steps=loop.step, batch_size=cfg.batch_size, seed=cfg.seed
    )
    info["train_seconds"] = round(loop.clock.elapsed, 1)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    summary = {"device": str(device), "steps": loop.step, "heldout_accuracy": accuracy}
    if export:
        Path(export).mkdir(parents=True, exist_ok=True)
        for part in (path, path.with_suffix(".json")):
            shutil.copy2(part, Path(export) / part.name)
        summary["exported_to"] = str(export)
    return write_summary(out, summary, start)


TRAINER = trainer(
    "the shapes classifier behind labkit.quality (prompt accuracy, FID features)",
    ClassifierConfig,
    PRESETS,
    lambda cfg, args: train_classifier(cfg, export=args.export),
    export="also save the classifier here, e.g. labkit/shapes (where quality reads it)",
    texts=HELP,
)
