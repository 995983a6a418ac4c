"""Model sources: the one loader, `load_pipeline`, for three kinds of source.

1. ``"shapes"``: our own tiny text-to-image model, trained by labkit and shipped in the package. The
   only source on which quality numbers mean something (see `labkit.quality`). ``"shapes:NAME"`` is a
   trained variant of it (``shapes_variants()``: e.g. ``vpred``, v-prediction on a cosine schedule).
2. ``"twin:NAME"``: a real Stable Diffusion architecture with random weights (configs in
   ``labkit/twins/NAME.json``). Speed, memory and FLOPs are those of the real model; images are noise.
3. a hub id or a local folder: plain ``from_pretrained`` (safetensors only), for users who have the weights.

Above the loader sit the two helpers every measurement shares: `generate`, the one way labkit calls a
pipeline (a seed per image, so a picture does not depend on the batch or the device), and
`unet_inputs`, random inputs for one call of a bare UNet.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from labkit.devices import resolve_device
from labkit.records import shown

TWINS_DIR = Path(__file__).parent / "twins"
HUB_HOST = "huggingface.co"

# A twin's text encoder keeps the real vocabulary size (so its parameter count is exact), but the
# tokenizer is ours: byte-level, no merges. A prompt becomes more tokens than with CLIP's BPE, yet
# every prompt is padded to 77 tokens, so the text encoder does exactly the work of the real one.
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


class SourceError(RuntimeError):
    """A model source that cannot be loaded here; the message says what to do instead."""


def twin_names() -> list[str]:
    """The architectures available as ``twin:NAME``."""
    return sorted(p.stem for p in TWINS_DIR.glob("*.json"))


def twin_config(name: str) -> dict:
    """The data file describing twin ``name``: pipeline class, image size, and component configs.

    A file may name another twin in ``"extends"`` and give only what differs (the BK-SDM students).
    """
    path = TWINS_DIR / f"{name}.json"
    if not path.exists():
        raise SourceError(f"unknown twin {name!r}; choose one of: {', '.join(twin_names())}")
    config = json.loads(path.read_text())
    if "extends" in config:
        parent = twin_config(config.pop("extends"))
        parent["unet"] = parent["unet"] | config.pop("unet", {})
        config = parent | config
    return config


def load_pipeline(
    source: str = "shapes",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    variant: str | None = None,
):
    """Load a diffusers pipeline from ``source``: ``"shapes"`` (or a variant, ``"shapes:vpred"``),
    ``"twin:NAME"``, a folder or a hub id.

    The pipeline is the untouched baseline of diffusers' philosophy: full precision (fp32) unless
    ``dtype`` says otherwise, diffusers' default attention (PyTorch SDPA), the model's own scheduler.
    ``seed`` only matters for twins: it draws their random weights. ``variant`` picks a folder's or
    hub model's weight files saved with ``variant=`` (``"fp16"``: ``*.fp16.safetensors``). Every
    optimization is then an explicit step (`labkit.apply`). Chapter 0 explains the three kinds of source.
    """
    if not isinstance(source, str) or not source.strip():
        raise SourceError(
            "no model source given: use 'shapes', a twin such as 'twin:sd15', a folder or a hub id"
        )
    dtype = as_dtype(dtype)
    try:
        device = resolve_device(device)
    except ValueError as error:
        raise SourceError(str(error)) from None
    if source == "shapes":
        pipe = _load_shapes(dtype)
    elif source.startswith("shapes:"):
        pipe = _load_shapes_variant(source.removeprefix("shapes:"), dtype)
    elif source.startswith("twin:"):
        pipe = _build_twin(source.removeprefix("twin:"), dtype, device, seed)
    else:
        pipe = _load_pretrained(source, dtype, variant)
    pipe.to(device)
    pipe.labkit_source = source
    # the scheduler the model was trained with: every sampler swap starts from it, and custom_scheduler
    # warns when asked for a schedule or prediction type the model was not trained with
    pipe.labkit_scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    pipe.labkit_applied = []
    pipe.labkit_call = {}
    return pipe


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``"float16"``, ``"fp16"``, ``torch.float16``, ... as a `torch.dtype` (None: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def _load_shapes(dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    from labkit.shapes import MODEL_DIR

    if not (Path(MODEL_DIR) / "model_index.json").exists():
        raise SourceError(
            f"the embedded 'shapes' model is missing from {shown(MODEL_DIR)}. Train it with `labkit train shapes`, "
            "or use a twin such as 'twin:sd15' for speed and memory."
        )
    return StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=dtype, use_safetensors=True)


def shapes_variants() -> list[str]:
    """The trained variants of ``shapes`` that load as a whole pipeline, ``"shapes:NAME"``.

    A variant is a folder ``labkit/shapes/variants/NAME/`` with its own ``unet/`` (stored fp16) and,
    optionally, ``scheduler/``; the rest (text encoder, tokenizer, VAE) is the shipped model's.
    """
    from labkit.shapes import VARIANTS_DIR

    return sorted(p.parent.parent.name for p in Path(VARIANTS_DIR).glob("*/unet/config.json"))


def _load_shapes_variant(name: str, dtype: torch.dtype):
    """The shipped ``shapes`` pipeline with a variant's UNet (upcast to ``dtype``) and scheduler."""
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from labkit.shapes import MODEL_DIR, VARIANTS_DIR

    if name not in shapes_variants():
        raise SourceError(
            f"unknown shapes variant {name!r}; choose one of: "
            + ", ".join(f"'shapes:{n}'" for n in shapes_variants())
            + " (or 'shapes', the shipped model)"
        )
    folder = Path(VARIANTS_DIR) / name
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, use_safetensors=True)
    parts = {"unet": unet}
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.exists():
        config = json.loads(scheduler_config.read_text())
        parts["scheduler"] = getattr(diffusers, config["_class_name"]).from_config(config)
    return StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=dtype, use_safetensors=True, **parts)


def _check_folder(path: Path) -> None:
    """Say exactly what is missing from a pipeline folder, before diffusers fails on it."""
    index = path / "model_index.json"
    if not index.exists():
        raise SourceError(f"no diffusers pipeline folder at {path} (it needs a model_index.json)")
    parts = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0]]
    for part in parts:
        folder = path / part
        if not folder.is_dir():
            raise SourceError(f"{path} names a {part!r} in model_index.json but has no {part}/ folder")
        weights = list(folder.glob("*.safetensors"))
        pickles = list(folder.glob("*.bin")) + list(folder.glob("*.ckpt")) + list(folder.glob("*.pt"))
        if pickles and not weights:
            raise SourceError(
                f"{folder} holds only pickle weights ({pickles[0].name}): labkit loads safetensors only, "
                "because unpickling runs code. Convert once with diffusers: "
                f"Model.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)"
            )


def _load_pretrained(source: str, dtype: torch.dtype, variant: str | None = None):
    from diffusers import DiffusionPipeline

    alternatives = (
        "Offline, use the embedded 'shapes' model or a twin ("
        + ", ".join(f"'twin:{n}'" for n in twin_names())
        + ")."
    )
    options = {"dtype": dtype, "use_safetensors": True, "variant": variant}
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise SourceError(f"no folder at {path}, and it is not a hub id (owner/name). {alternatives}")
        try:
            _check_folder(path)
        except SourceError as error:
            raise SourceError(f"{error}. {alternatives}") from None
        return DiffusionPipeline.from_pretrained(path, **options)
    try:  # a copy already in the local hub cache works offline
        return DiffusionPipeline.from_pretrained(source, local_files_only=True, **options)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise SourceError(
            f"{source!r} is not in the local cache and the hub cannot be reached. {alternatives}"
        )
    return DiffusionPipeline.from_pretrained(source, **options)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers within ``timeout`` seconds, so an offline load fails fast."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


@cache
def _tokenizer_dir() -> str:
    """Write our byte-level CLIP-format tokenizer once per process and return its folder."""
    # GPT-2/CLIP's byte-to-character table: printable bytes map to themselves, the rest to 256 + n
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {_BOS: len(vocab), _EOS: len(vocab) + 1}
    folder = tempfile.mkdtemp(prefix="labkit-tokenizer-")
    Path(folder, "vocab.json").write_text(json.dumps(vocab))
    Path(folder, "merges.txt").write_text("#version: 0.2\n")
    config = {
        "model_max_length": 77,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
    }
    Path(folder, "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def twin_tokenizer():
    """The tokenizer used by every twin (see the note on ``_BOS`` above)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir())


def twin_components(name: str, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """The models of twin ``name`` with random weights, built on ``device`` ("meta" to count parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = twin_config(name)
    tokenizer = twin_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids([_BOS, _EOS])
    text_classes = {
        "CLIPTextModel": CLIPTextModel,
        "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
    }
    torch.manual_seed(seed)
    # Build directly on the target device: initialising 2.6B random weights on a CPU takes minutes.
    with torch.device(device):
        components = {"unet": UNet2DConditionModel(**config["unet"]), "vae": AutoencoderKL(**config["vae"])}
        for i, spec in enumerate(config["text_encoders"]):
            spec = dict(spec)
            text_config = CLIPTextConfig(**spec, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
            components["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = text_classes[
                spec.pop("class")
            ](text_config)
    return components


def _build_twin(name: str, dtype: torch.dtype, device: torch.device, seed: int):
    import diffusers

    config = twin_config(name)
    components = twin_components(name, device, seed)
    scheduler_spec = dict(config["scheduler"])
    # from_config, like from_pretrained, ignores keys a scheduler class does not use (the hub files have some)
    scheduler = getattr(diffusers, scheduler_spec.pop("class")).from_config(scheduler_spec)
    tokenizer = twin_tokenizer()
    if config["pipeline"] == "StableDiffusionXLPipeline":
        pipe = diffusers.StableDiffusionXLPipeline(
            **components,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **components,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with quiet_diffusers():
        return pipe.to(dtype=dtype)


@contextmanager
def quiet_diffusers():
    """Silence diffusers' info and warning logs (e.g. its note on casting with ``to()``) for a moment."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def native_size(pipe) -> int:
    """The image side in pixels that the pipeline's UNet was built for (512 for SD 1.5)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def is_twin(pipe) -> bool:
    """Whether ``pipe`` has random weights (its images are noise)."""
    return str(getattr(pipe, "labkit_source", "")).startswith("twin:")


DEFAULT_PROMPT = "a small red circle at the top left"
DEFAULTS = {"steps": 50, "guidance": 7.5, "batch": 1}
"""What a generation uses when neither the call nor an applied preset says otherwise (SD 1.x's own)."""


def call_settings(pipe, *, steps=None, size=None, batch=None, guidance=None) -> dict:
    """The settings of one generation: explicit arguments, else those the applied preset or optimizations
    set (``pipe.labkit_call``), else `DEFAULTS` and the native size."""
    preset = getattr(pipe, "labkit_call", {})
    given = {"steps": steps, "size": size, "batch": batch, "guidance": guidance}
    settings = {
        key: value if value is not None else preset.get(key, DEFAULTS.get(key))
        for key, value in given.items()
    }
    if settings["size"] is None:
        settings["size"] = native_size(pipe)
    return settings


def generate(
    pipe,
    prompt: str | list[str] | None = None,
    *,
    steps: int | None = None,
    size: int | None = None,
    batch: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    chunk: int | None = None,
    **call_kwargs,
):
    """Generate images with ``pipe``: a float array (N, H, W, 3) in [0, 1] (NaN kept where fp16 overflowed).

    One prompt is repeated ``batch`` times; a list of prompts is the batch. Image ``i`` starts from the
    noise of a CPU generator seeded ``seed + i``, so a picture does not depend on the batch size, the
    chunking or the device. ``chunk`` splits a long list into pipeline calls of at most that many
    prompts. Settings left unset come from `call_settings`. Every measurement of labkit generates
    through this function.
    """
    import numpy as np

    settings = call_settings(pipe, steps=steps, size=size, batch=batch, guidance=guidance)
    prompts = prompt if isinstance(prompt, list) else [prompt or DEFAULT_PROMPT] * settings["batch"]
    chunk = chunk or len(prompts)
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            generators = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(len(part))]
            output = pipe(
                prompt=part,
                num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance"],
                height=settings["size"],
                width=settings["size"],
                generator=generators,
                output_type="np",
                **call_kwargs,
            )
            out.append(np.asarray(output.images, dtype=np.float32))
    return np.concatenate(out)


def unet_inputs(
    unet, *, side: int, batch: int = 1, device: str | torch.device | None = None, dtype=None
) -> dict:
    """Random keyword inputs for one call of a bare ``unet`` on ``batch`` latents of ``side`` x ``side``.

    With classifier-free guidance a pipeline calls the UNet on twice its batch: pass ``2 * images``.
    SDXL-style UNets also get their added conditions (pooled text embeddings, size ids). Works on the
    "meta" device, where FLOPs can be counted without memory.
    """
    config = unet.config
    weights = next(unet.parameters())
    device = weights.device if device is None else device
    dtype = weights.dtype if dtype is None else dtype
    options = {"device": device, "dtype": dtype}
    inputs = {
        "sample": torch.randn(batch, config.in_channels, side, side, **options),
        "timestep": torch.full((batch,), 500, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, **options),
    }
    if config.addition_embed_type == "text_time":
        time_ids = 6 * config.addition_time_embed_dim
        pooled = config.projection_class_embeddings_input_dim - time_ids
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, **options),
            "time_ids": torch.zeros(batch, 6, **options),
        }
    return inputs
