"""Swaps: replace a component by a trained one. The tuned VAE (tier 1) and a distilled student UNet (tier 3).

Both need trained weights: the ``shapes`` model ships its own (``variants/vae``, ``variants/student``);
for a twin, whose weights are random, a tuned VAE would change nothing that a twin measures, while a
student's smaller architecture does (its speed, memory and FLOPs). The student's architecture is
BK-SDM's cut (Kim et al., 2023), `bk_layers` and `student_config`: one residual + attention pair fewer
per stage, and no mid block.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labkit.optimizations.registry import SWAP, Unavailable, optimization
from labkit.records import shown

CUTS = ("teacher", "BK-SDM-Base", "BK-SDM-Small")
"""The teacher and its two BK-SDM cuts: Base keeps the mid block, Small removes it."""


def _load_component(cls, source, pipe):
    """A VAE or UNet given as a module or a folder, in the pipeline's dtype and device."""
    from labkit.models import quiet_diffusers

    if isinstance(source, torch.nn.Module):
        module = source
    else:
        path = Path(source)
        if not (path / "config.json").exists():
            raise Unavailable(f"no {cls.__name__} folder at {path} (it needs a config.json)")
        module = cls.from_pretrained(path, use_safetensors=True)
    with quiet_diffusers():  # its note on casting with to() concerns modules kept in fp32; ours have none
        return module.to(device=pipe.unet.device, dtype=pipe.unet.dtype)


def variant_dir(source: str | None, kind: str) -> Path:
    """The folder of a trained component (``vae``: a tuned VAE; ``student``: a distilled UNet) of ``source``.

    Raises `Unavailable` with the reason where the source ships none.
    """
    if source == "shapes" or (kind == "vae" and str(source).startswith("shapes:")):  # variants share it
        from labkit.shapes import VARIANTS_DIR

        folder = Path(VARIANTS_DIR) / kind
        if (folder / "config.json").exists():
            return folder
        raise Unavailable(f"the shapes model has no trained {kind} variant yet (expected in {shown(folder)})")
    if kind == "vae":
        raise Unavailable(
            f"{source} ships no tuned VAE: a fine-tuned VAE has the same architecture, so on a twin it "
            "would change the pictures, not the speed or memory; pass vae= a folder or module"
        )
    raise Unavailable(f"{source} ships no {kind}; pass a folder or module")


@optimization(tier=1, stage=SWAP)
def swap_vae(pipe, vae=None) -> str:
    """Replace the VAE (the guide's tuned VAE); by default the source's fine-tuned decoder, if it has one."""
    from diffusers import AutoencoderKL

    if vae is None:
        vae = variant_dir(getattr(pipe, "labkit_source", None), "vae")
    before = pipe.vae.config.get("_name_or_path") or "the pipeline's VAE"
    pipe.vae = _load_component(AutoencoderKL, vae, pipe)
    return f"vae {before} -> {pipe.vae.config.get('_name_or_path') or 'the given module'}"


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


def student_config(teacher_config: dict, layers_per_block=None, mid_block: bool = False) -> dict:
    """The ``UNet2DConditionModel`` config of a BK-SDM-style student of ``teacher_config``.

    ``layers_per_block``: residuals (+ attentions) per down stage (each up stage gets one more; default
    `bk_layers`); ``mid_block=False`` removes the mid block. A 0 is only possible where the stage keeps
    its width.
    """
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    channels = list(config["block_out_channels"])
    if layers_per_block is None:
        layers_per_block = bk_layers(config)
    layers = [int(n) for n in layers_per_block]
    if len(layers) != len(channels):
        raise ValueError(
            f"layers_per_block has {len(layers)} entries but the teacher has {len(channels)} stages "
            f"({channels}); give one count per stage, e.g. {tuple(bk_layers(config))}"
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


def bk_cuts(unet_config: dict) -> dict[str, dict]:
    """The teacher's UNet config and its two BK-SDM cuts (see `CUTS`).

    A per-stage list that is the same everywhere is written as one number, as diffusers' configs do.
    """
    teacher = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    layers = bk_layers(teacher)
    base = student_config(teacher, layers, mid_block=True)
    small = student_config(teacher, layers, mid_block=False)
    for config in (base, small):
        if len(set(config["layers_per_block"])) == 1:
            config["layers_per_block"] = config["layers_per_block"][0]
    return dict(zip(CUTS, (teacher, base, small), strict=True))


STUDENT_TWINS = ("twin:sd15", "twin:bk-sdm-base")
"""Twins whose student is a real published one: BK-SDM-Small (``twin:bk-sdm-small``), cut from SD 1.5."""


@optimization(tier=3, stage=SWAP)
def distilled_student(pipe, unet=None) -> str:
    """Replace the UNet by a smaller student distilled from it (BK-SDM style); by default the source's own.

    On the SD 1.5 twin the student is BK-SDM-Small's architecture with random weights, like the twin
    (its speed, memory and FLOPs); on ``shapes`` it is the trained student shipped in ``variants/student``.
    """
    from diffusers import UNet2DConditionModel

    source = str(getattr(pipe, "labkit_source", ""))
    before = sum(p.numel() for p in pipe.unet.parameters())
    if unet is None and source in STUDENT_TWINS:
        from labkit.models import twin_config

        with torch.device(pipe.unet.device):  # random weights, like the twin
            unet = UNet2DConditionModel(**twin_config("bk-sdm-small")["unet"])
    elif unet is None:
        unet = variant_dir(source, "student")
    pipe.unet = _load_component(UNet2DConditionModel, unet, pipe)
    after = sum(p.numel() for p in pipe.unet.parameters())
    return f"UNet {before / 1e6:.3g}M -> student {after / 1e6:.3g}M parameters"
