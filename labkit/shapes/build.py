"""The shapes model's components and their sizes: a real (tiny) Stable Diffusion pipeline.

- **tokenizer**: CLIP-format BPE fitted to the prompt words (:mod:`labkit.shapes.tokenizer`).
- **text encoder**: a small ``CLIPTextModel`` (causal transformer, 77 positions, as in SD 1.x).
- **VAE**: an ``AutoencoderKL`` with downsampling factor f=4: 64x64x3 images <-> 16x16x4 latents. SD uses
  f=8, but at 64 px that would leave 8x8 latents in which a small shape (11 px across) covers about one
  latent pixel and its kind (circle / square / triangle) would have to live in 4 numbers; f=4 keeps a
  small shape about 3 latent pixels wide and still compresses 12x (SD's f=8 with 4 channels: 48x).
- **UNet**: a ``UNet2DConditionModel`` going down 16x16 -> 1x1, cross-attention to the text at 4x4, 2x2, 1x1.
- **scheduler**: SD 1.5's own ``PNDMScheduler`` config, so the lab's samplers behave as on SD.

:func:`build_pipeline` gives an untrained pipeline of any :class:`ModelConfig` (the trainers start from it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .data import IMAGE_SIZE
from .tokenizer import MAX_LENGTH, fit_tokenizer

# SD 1.5's scheduler config (runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json)
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,  # PNDM ignores it; DDIM and DDPM would clip latents to [-1, 1] without it
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclass
class ModelConfig:
    """The sizes of the shapes model. The defaults are the shipped model; tests use :meth:`tiny`."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels = 2 downsamplings = f=4
    vae_norm_groups: int = 8
    # 5 levels: 16x16 -> 8 -> 4 -> 2 -> 1 (see build_unet for why it goes down to 1x1)
    unet_channels: tuple[int, ...] = (32, 64, 64, 96, 96)
    unet_cross_attention: tuple[bool, ...] = (False, False, True, True, True)
    unet_layers_per_block: int = 1
    unet_head_dim: int = 32
    unet_norm_groups: int = 16
    latent_channels: int = 4
    image_size: int = IMAGE_SIZE
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A very small model for tests: same structure, a few thousand parameters per part."""
        return cls(
            text_hidden=16,
            text_layers=1,
            text_heads=2,
            vae_channels=(8, 16, 16),
            vae_norm_groups=4,
            unet_channels=(16, 16, 32),
            unet_cross_attention=(False, True, True),
            unet_head_dim=8,
            unet_norm_groups=4,
        )

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vae_channels"] = list(self.vae_channels)
        d["unet_channels"] = list(self.unet_channels)
        d["unet_cross_attention"] = list(self.unet_cross_attention)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["vae_channels"] = tuple(d["vae_channels"])
        d["unet_channels"] = tuple(d["unet_channels"])
        d["unet_cross_attention"] = tuple(d["unet_cross_attention"])
        return cls(**d)


def build_text_encoder(cfg: ModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small CLIP text transformer whose vocabulary and special ids match ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """An ``AutoencoderKL`` with factor ``2 ** (len(vae_channels) - 1)`` (f=4 for the shipped model)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` whose levels go down to 1x1, with cross-attention at the coarse levels.

    Why down to 1x1: a UNet's convolutions are the same at every pixel, so the only clue to *where* a pixel
    is comes from the zero padding at the borders, and at high noise (where sampling decides the layout)
    that clue is faint. Going down to 1x1 gives the network a global code (the 1x1 cross-attention reads
    the whole prompt) that the up path turns into a layout: upsampling 1x1 -> 2x2 -> 4x4 with padded 3x3
    convolutions applies a different linear map at each cell, as a DCGAN generator does. It is also cheaper
    than the first design (16 -> 8 -> 4, cross-attention at 8x8 and 4x4): 0.32 s vs 0.66 s per training step
    of 32 on one CPU thread. That first design put shapes at random places (position accuracy 0.12, chance
    0.11) after 3300 steps, but it also trained the text encoder jointly, which erased the position words
    (see `labkit.training.shapes`), so the architecture change alone was not measured.
    """
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_cross_attention))
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_head_dim,
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_scheduler(
    prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear", rescale_zero_snr: bool = False
) -> PNDMScheduler:
    """SD 1.5's PNDM scheduler config, with the training choices that a model variant was trained with.

    ``rescale_betas_zero_snr`` is recorded in the config (PNDM ignores it; DDIM, DPM-Solver++, Euler read it).
    """
    config = dict(SD15_SCHEDULER, prediction_type=prediction_type, beta_schedule=beta_schedule)
    scheduler = PNDMScheduler.from_config(config)
    if rescale_zero_snr:
        scheduler.register_to_config(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return scheduler


def build_pipeline(
    cfg: ModelConfig, tokenizer_dir: str | Path, **scheduler_kwargs
) -> StableDiffusionPipeline:
    """An untrained shapes pipeline (random weights) of the given sizes; the tokenizer is written to a folder."""
    tokenizer = fit_tokenizer(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=build_vae(cfg),
        text_encoder=build_text_encoder(cfg, tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(cfg),
        scheduler=build_scheduler(**scheduler_kwargs),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
