"""What every trainer shares: the job runner, the config base, checkpoints, and the pieces of the loop.

- **Configs**: `TrainConfig` holds the fields of every job (out, device, seed, steps, minutes, batch size,
  learning rate, checkpoints, logging, held-out evaluation, progress); `DiffusionConfig` adds those of
  the jobs that train a UNet to denoise (image bank, warm-up, min-SNR weights, prompt dropout). A job's
  ``PRESETS`` are field values over its defaults; `add_config_arguments` gives every scalar field a flag
  (``bank_size`` -> ``--bank-size``) and `config_from_args` sets the flags that were given over the
  preset.
- **The runner**: `run_job` sets ``--threads``, clears the checkpoints on ``--fresh``, turns SIGTERM
  (a killed job, a CI timeout) into the Ctrl-C path that saves a checkpoint, and prints the summary.
- **The loop**: `Loop` resumes a stage from its checkpoint (weights, optimizer, EMA, random generators,
  step, elapsed time), stops at its step count or time budget, logs to ``OUT/train_log.jsonl``, shows a
  progress bar, and saves every ``checkpoint_minutes``, on Ctrl-C and at the end. `optimizer_step`,
  `warmup`, `EMA` are the rest of a step.
- **Denoising data**: `make_bank` draws the training images once (uint8, on the device),
  `encode_bank` encodes them once, `tokenize_prompts` / `encode_prompts` do the 271 prompts once, and
  `DenoisingBatches` draws each step's noisy latents, timesteps, prompts and target from a generator
  seeded by the step (so a resumed run draws what an uninterrupted one would), with `snr_weight`
  (min-SNR) and `noise_scheduler`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from labkit.devices import resolve_device
from labkit.optimizations.samplers import use_sampler
from labkit.quality import evaluate
from labkit.shapes import CLASSIFIER_PATH, MODEL_DIR, data

# ----------------------------------------------------------------------------------------------------------
# a job and its config


@dataclass(frozen=True)
class Trainer:
    """One ``labkit train`` job: its one-line help, its arguments and the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@dataclass
class TrainConfig:
    """The fields every training job has; a job's config adds its own and changes the defaults."""

    out: str = "runs/train"
    device: str = "auto"
    seed: int = 0
    steps: int = 1000
    minutes: float = 60.0
    batch_size: int = 32
    lr: float = 1e-3
    checkpoint_minutes: float = 2.0
    log_every: int = 20
    eval_n: int = 200
    progress: bool = True

    def to_dict(self) -> dict:
        """The config as JSON-able values (recorded in checkpoints and in what a job exports)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class DiffusionConfig(TrainConfig):
    """A job that trains a UNet to denoise latents of the shapes data (the model, its student, QAT)."""

    bank_size: int = 20_000
    warmup_steps: int = 100
    snr_gamma: float = 5.0
    cfg_dropout: float = 0.1


HELP = {
    "out": "work folder: checkpoints/, logs, summary.json",
    "device": "auto, cpu, cuda or cuda:N",
    "seed": "seed of the weights and of every batch",
    "steps": "training steps (a resumed run goes on to this many)",
    "minutes": "time budget: stop after this long even if steps remain",
    "batch_size": "images per step",
    "lr": "learning rate",
    "checkpoint_minutes": "save a checkpoint this often",
    "log_every": "log (and show) the losses every this many steps",
    "eval_n": "held-out prompts scored at the end (0: skip)",
    "progress": "progress bars",
    "bank_size": "training images drawn up front",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "snr_gamma": "min-SNR loss weights: clip the SNR above (0: off)",
    "cfg_dropout": "share of prompts dropped to '' (classifier-free guidance)",
}
"""Help of the common fields; a job adds its own."""


def _flag_type(default: Any, annotation: str):
    """The argparse type of a field, from its default (or its annotation where the default is None)."""
    if isinstance(default, bool):
        return None
    for kind in (int, float, str):
        if isinstance(default, kind) or (default is None and kind.__name__ in str(annotation)):
            return kind
    return None


def _flag_fields(config: type[TrainConfig]) -> list:
    """The fields of ``config`` that flags may set (a field with ``metadata={"flag": False}`` is set by
    presets only)."""
    return [f for f in fields(config) if f.metadata.get("flag", True)]


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config: type[TrainConfig],
    presets: Mapping[str, dict],
    *,
    texts: Mapping[str, str] | None = None,
    choices: Mapping[str, tuple] | None = None,
    types: Mapping[str, Callable] | None = None,
) -> None:
    """``--preset`` and one flag per scalar field of ``config`` (``snr_gamma`` -> ``--snr-gamma``).

    Every flag defaults to None (not given: the preset's value stands); its help shows the first
    preset's value. A bool field gets ``--x`` and ``--no-x``; ``types`` parses a field that is not a plain
    number or text (e.g. a list of ints); ``texts`` adds the help of the job's own fields to `HELP`.
    """
    first = next(iter(presets))
    parser.add_argument("--preset", choices=list(presets), default=first,
                        help=f"the defaults below ({first}); flags override them")  # fmt: skip
    texts, choices, types = {**HELP, **(texts or {})}, choices or {}, types or {}
    for f in _flag_fields(config):
        default = f.default if f.default is not MISSING else None
        kind = types.get(f.name) or _flag_type(default, f.type)
        if kind is None and not isinstance(default, bool):
            continue  # neither a number, text nor a bool: presets set it
        value = presets[first].get(f.name, default)
        text = " ".join(filter(None, [texts.get(f.name), None if value is None else f"({value})"]))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text.replace("%", "%%")
            )
        else:
            parser.add_argument(
                flag, type=kind, choices=choices.get(f.name), default=None, help=text.replace("%", "%%")
            )


def add_job_arguments(parser: argparse.ArgumentParser, export: str) -> None:
    """The runner's flags: ``--export`` (what it is for this job), ``--threads``, ``--fresh``."""
    parser.add_argument("--export", default=None, metavar="DIR", help=export)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, try 1)"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore (delete) the checkpoints in --out")


def config_from_args(config: type[TrainConfig], presets: Mapping[str, dict], args: argparse.Namespace):
    """``config`` from the preset ``args.preset``, each flag that was given set over it."""
    cfg = config(**presets[args.preset])
    for f in _flag_fields(config):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    return cfg


def ints(text: str) -> tuple[int, ...]:
    """``"0,1,0"`` -> ``(0, 1, 0)``: a flag that takes one whole number per stage."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give whole numbers separated by commas, e.g. 0,1,0"
        ) from None


def trainer(
    help: str,
    config: type[TrainConfig],
    presets: Mapping[str, dict],
    job: Callable[[Any, argparse.Namespace], dict],
    *,
    export: str,
    more_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    **flags: Any,
) -> Trainer:
    """The `Trainer` of a job that is a config and a function: its flags (`add_config_arguments` with
    ``flags``, `add_job_arguments`, ``more_arguments``), and a run that builds the config from them and
    runs ``job(cfg, args)`` through `run_job`."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, config, presets, **flags)
        add_job_arguments(parser, export=export)
        if more_arguments is not None:
            more_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        cfg = config_from_args(config, presets, args)
        return run_job(args, cfg.out, lambda: job(cfg, args))

    return Trainer(help, add_arguments, run)


# ----------------------------------------------------------------------------------------------------------
# the runner


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_job(args: argparse.Namespace, out: str | Path, job: Callable[[], dict]) -> int:
    """Run one training job: ``--threads``, ``--fresh``, then ``job()`` with SIGTERM saving a checkpoint as
    Ctrl-C does; print the summary it returns as JSON. Returns the exit status (130 when interrupted)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "fresh", False):
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


def write_summary(out: Path, summary: dict, start: float | None = None) -> dict:
    """Write ``summary`` to ``OUT/summary.json``, with the job's wall time since ``start`` (when given)
    as ``seconds``; returns it."""
    if start is not None:
        summary["seconds"] = round(time.perf_counter() - start, 1)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> a CUDA GPU if there is one, else the CPU (`labkit.devices.resolve_device`)."""
    return resolve_device(None if name == "auto" else name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def copy_folder(src: Path, dst: Path) -> None:
    """Copy every file of ``src`` into ``dst`` (created; files already there are replaced)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in Path(src).rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def pipeline_folder(source: str | Path) -> Path:
    """The folder of a shapes pipeline given as ``"shapes"`` (the shipped model) or as a folder."""
    return Path(MODEL_DIR) if str(source) == "shapes" else Path(source)


def load_vae(source: str | Path, device: str | torch.device = "cpu"):
    """The VAE (fp32, eval mode) of a shapes pipeline: ``"shapes"`` (the shipped model) or a folder."""
    from diffusers import AutoencoderKL

    path = pipeline_folder(source) / "vae"
    if not (path / "config.json").exists():
        raise ValueError(f"no VAE at {path}: give 'shapes' (the shipped model) or a shapes pipeline folder")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True).to(device).eval()


def quick_eval(pipe, n: int) -> dict:
    """Prompt accuracy and FID of ``pipe`` on ``n`` held-out prompts, DPM-Solver++ at 20 steps (needs the
    shapes classifier)."""
    if not CLASSIFIER_PATH.exists():
        return {"skipped": "no classifier; run `labkit train classifier --export labkit/shapes`"}
    use_sampler(pipe, "DPM++ 2M", 20)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate(pipe, n=n, steps=20)
    return {k: v for k, v in result.items() if k != "images"}


# ----------------------------------------------------------------------------------------------------------
# checkpoints: safetensors for every tensor (weights, optimizer moments, EMA, generators), json for the rest


def save_checkpoint(
    path: Path, modules: dict, optimizer, ema: dict | None, meta: dict, generators: dict | None = None
) -> None:
    """Write ``path`` (safetensors) and its ``.json`` atomically: each file is replaced whole or not at all."""
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
    for k, g in (generators or {}).items():
        tensors[f"rng.{k}"] = g.get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    meta = dict(meta, optimizer=opt_meta)
    tmp_json = path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, path.with_suffix(".json"))


def load_checkpoint(
    path: Path, modules: dict, optimizer, ema: dict | None, device, generators: dict | None = None
) -> dict:
    """Load what `save_checkpoint` wrote into ``modules`` (and ``optimizer``, ``ema``, ``generators`` when
    given); returns the checkpoint's meta (step, elapsed, config...)."""
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
    for k, g in (generators or {}).items():
        g.set_state(tensors[f"rng.{k}"])
    return meta


# ----------------------------------------------------------------------------------------------------------
# the loop


class Clock:
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


def log(out: Path, record: dict) -> None:
    """Append ``record`` to ``OUT/train_log.jsonl``."""
    with open(Path(out) / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


class Loop:
    """One training stage: resume from its checkpoint, run steps until ``steps`` or ``minutes``, save.

    Built right before the stage runs (its clock starts then); ``loop.step`` and ``loop.resumed`` (the
    checkpoint's meta, ``{}`` on a fresh start) are known at once, so that a job can check or catch up
    on what it resumes. ``meta`` goes into every checkpoint; each function of ``on_save`` is called
    after each save with the checkpoint's meta (to export the model as it stands).
    """

    def __init__(
        self,
        stage: str,
        cfg: TrainConfig,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        ema: EMA | None = None,
        generators: dict[str, torch.Generator] | None = None,
        steps: int | None = None,
        minutes: float | None = None,
        meta: dict | None = None,
    ):
        self.stage, self.cfg, self.modules, self.optimizer = stage, cfg, modules, optimizer
        self.ema = ema.state if ema is not None else None
        self.generators = generators or {}
        self.steps = cfg.steps if steps is None else steps
        self.minutes = cfg.minutes if minutes is None else minutes
        self.meta = meta or {}
        self.out = Path(cfg.out)
        self.checkpoint = self.out / "checkpoints" / f"{stage}.safetensors"
        self.on_save: list[Callable[[dict], None]] = []
        self.last: dict[str, float] = {}
        self.step, elapsed, self.resumed = 0, 0.0, {}
        if self.checkpoint.exists():
            self.resumed = load_checkpoint(
                self.checkpoint, modules, optimizer, self.ema, device, self.generators
            )
            self.step, elapsed = self.resumed["step"], self.resumed["elapsed"]
        self.clock = Clock(elapsed, cfg.checkpoint_minutes)

    def save(self) -> None:
        meta = {"stage": self.stage, "step": self.step, "elapsed": self.clock.elapsed, **self.meta}
        meta["config"] = self.cfg.to_dict()
        save_checkpoint(self.checkpoint, self.modules, self.optimizer, self.ema, meta, self.generators)
        for hook in self.on_save:
            hook(meta)

    def run(self, train_step: Callable[[int], dict[str, torch.Tensor]]) -> None:
        """Call ``train_step(step)`` until the step count or the time budget is reached.

        ``train_step`` returns the step's losses (0-d tensors); they are read (``.item()``, which waits
        for the GPU) only on the steps that log them.
        """
        from tqdm.auto import tqdm

        bar = tqdm(total=self.steps, initial=self.step, desc=self.stage, disable=not self.cfg.progress)
        try:
            while self.step < self.steps and self.clock.elapsed < self.minutes * 60:
                losses = train_step(self.step)
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0:
                    self.last = {k: v.item() for k, v in losses.items()}
                    bar.set_postfix({k: f"{v:.5g}" for k, v in self.last.items()})
                    record = {"stage": self.stage, "step": self.step, **self.last}
                    log(self.out, record | {"elapsed": round(self.clock.elapsed, 1)})
                if self.clock.due():
                    self.save()
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            bar.close()
        self.save()


def optimizer_step(optimizer, loss: torch.Tensor, params, max_norm: float | None = 1.0) -> None:
    """Backpropagate ``loss``, clip the gradients' norm to ``max_norm`` (None: no clipping), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup(step: int, steps: int) -> float:
    """The linear warm-up factor of step ``step`` (0-based) over ``steps`` steps: 1 after them."""
    return min(1.0, (step + 1) / max(1, steps))


class EMA:
    """An exponential moving average of parameters (what the denoising jobs export), by name.

    The decay ramps up as ``(1 + step) / (10 + step)`` to ``decay``, so early weights fade fast.
    """

    def __init__(self, named: Mapping[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = list(named.values())
        self.state = {k: p.detach().clone().float() for k, p in named.items()}
        self._values = list(self.state.values())

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._values, [p.detach().float() for p in self.params], 1 - decay)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The averages of the parameters named ``PREFIX.name``, by ``name`` (a module's state dict)."""
        return {k[len(prefix) + 1 :]: v for k, v in self.state.items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------------------------------------
# denoising data


def prompt_index(labels: dict[str, np.ndarray]) -> np.ndarray:
    """Index of each image's prompt in `labkit.shapes.data.all_prompts`."""
    sizes = [len(v) for v in data.ATTRIBUTES.values()]
    index = np.zeros_like(labels["shape"])
    for name, n in zip(data.ATTRIBUTES, sizes, strict=True):
        index = index * n + labels[name]
    return index


def make_bank(n: int, seed: int, device, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images as uint8 NCHW on ``device`` (the device never waits for numpy), and the index
    of each one's prompt."""
    images, index = [], []
    for i, start in enumerate(range(0, n, chunk)):
        batch = data.sample(min(chunk, n - start), seed=seed * 1_000_003 + i, split="train")
        images.append(torch.from_numpy((batch.images * 255 + 0.5).astype(np.uint8)).permute(0, 3, 1, 2))
        index.append(torch.from_numpy(prompt_index(batch.labels)))
    return torch.cat(images).to(device), torch.cat(index).to(device)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return images_u8.float() / 127.5 - 1.0


@torch.no_grad()
def encode_bank(vae, bank: torch.Tensor, device, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every bank image (each step samples its latents from them)."""
    means, stds = [], []
    for i in range(0, len(bank), batch_size):
        with autocast(device):
            dist = vae.encode(to_float(bank[i : i + batch_size])).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


EMPTY = len(data.all_prompts())
"""Index of the empty prompt (classifier-free guidance) after the 270 prompts in `tokenize_prompts`."""


def tokenize_prompts(tokenizer, device) -> torch.Tensor:
    """Token ids of the 270 prompts and of "" (index `EMPTY`), tokenized once."""
    from labkit.shapes.tokenizer import MAX_LENGTH  # transformers: loaded when a job runs, not at `labkit -h`

    prompts = data.all_prompts() + [""]
    ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    return ids.input_ids.to(device)


@torch.no_grad()
def encode_prompts(text_encoder, token_ids: torch.Tensor) -> torch.Tensor:
    """A frozen text encoder's output for every prompt, computed once."""
    return text_encoder(token_ids)[0]


def noise_scheduler(config: Mapping):
    """The ``DDPMScheduler`` that noises training latents, from a pipeline's scheduler config (only the
    betas, the number of timesteps and the prediction type matter to training)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        prediction_type=config.get("prediction_type", "epsilon"),
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
    )


def snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Loss weights that clip the SNR to [floor, gamma], for the scheduler's epsilon or v targets.

    ``gamma`` is min-SNR-gamma (Hang et al., 2023): less weight on the nearly clean steps, which converges
    faster at equal steps. ``floor`` does the opposite at the noisy end: an epsilon loss weighs errors in
    the clean image by the SNR, nearly 0 at the first sampling steps, which is exactly where the layout
    (the shape's *position*) is decided; clipping the SNR from below gives those steps the weight of SNR
    ``floor``.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp(min=1e-8)
    clipped = snr.clamp(min=floor, max=gamma if gamma > 0 else None)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def sample_timesteps(n: int, num_train_timesteps: int, high_noise: float, g: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, except that a fraction ``high_noise`` is drawn from the noisiest 30%."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=g)
    high = torch.randint(int(0.7 * num_train_timesteps), num_train_timesteps, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < high_noise, high, t)


@dataclass
class Batch:
    """One step's training batch: clean and noisy latents, the noise, timesteps, prompt indices, target."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor


class DenoisingBatches:
    """Each step's batch, drawn from the encoded bank with a generator seeded by the step.

    ``stream`` separates the jobs' random streams (the shapes UNet, a student, QAT); ``scaling_factor``
    is the VAE's; ``cfg_dropout`` of the prompts become the empty one; ``high_noise`` of the timesteps
    come from the noisiest 30%. The target is the noise, or the velocity for a v-prediction scheduler.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        bank_prompts: torch.Tensor,
        scaling_factor: float,
        scheduler,
        *,
        seed: int,
        stream: int,
        cfg_dropout: float,
        high_noise: float = 0.0,
    ):
        self.means, self.stds, self.bank_prompts = means, stds, bank_prompts
        self.scaling_factor, self.scheduler = scaling_factor, scheduler
        self.seed, self.stream, self.cfg_dropout, self.high_noise = seed, stream, cfg_dropout, high_noise

    def __call__(self, step: int, n: int) -> Batch:
        device = self.means.device
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream + step)
        idx = torch.randint(0, len(self.means), (n,), generator=g).to(device)
        eps = torch.randn(self.means[idx].shape, generator=g).to(device)
        latents = (self.means[idx] + self.stds[idx] * eps) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = sample_timesteps(n, self.scheduler.config.num_train_timesteps, self.high_noise, g)
        timesteps = timesteps.to(device)
        drop = (torch.rand(n, generator=g) < self.cfg_dropout).to(device)
        prompts = torch.where(drop, torch.full_like(self.bank_prompts[idx], EMPTY), self.bank_prompts[idx])
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return Batch(latents, noise, timesteps, prompts, noisy, target)


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each example of a batch, shape ``(n,)``."""
    squared = torch.nn.functional.mse_loss(pred.float(), target, reduction="none")
    return squared.mean(dim=tuple(range(1, squared.dim())))
