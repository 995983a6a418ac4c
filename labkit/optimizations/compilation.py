"""Compilation (tier 2): ``torch.compile`` of the UNet (whole or regional), and the layout changes that
help compiled kernels: fused QKV projections and channels-last memory format.
"""

from __future__ import annotations

import torch

from labkit.optimizations.registry import COMPILE, LAYOUT, execution_device, optimization

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@optimization(tier=2, stage=LAYOUT)
def fuse_qkv(pipe) -> str:
    """Fuse the query, key and value projections of self-attention into one matmul (UNet and VAE)."""
    pipe.fuse_qkv_projections()
    return "self-attention q/k/v projections fused into one linear layer"


@optimization(tier=2, stage=LAYOUT)
def channels_last(pipe) -> str:
    """Store UNet and VAE activations in channels-last (NHWC) order, which tensor-core convolutions prefer."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    return "UNet and VAE memory format -> channels_last"


@optimization(tier=2, stage=COMPILE)
def torch_compile(
    pipe,
    mode: str = "default",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    vae: bool = False,
    regional: bool = False,
) -> str:
    """`torch.compile` the UNet (and the VAE decoder if ``vae``); ``regional`` compiles only its repeated blocks.

    The first call pays the compile time (a minute or more for a whole SD UNet on a GPU; regional
    compilation is several times faster). ``reduce-overhead`` adds CUDA graphs, which remove the
    launch cost of small kernels at batch 1.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if regional:
        pipe.unet.compile_repeated_blocks(mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        what = f"UNet's repeated transformer blocks compiled (mode={mode})"
    else:
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        what = f"UNet compiled (mode={mode}, fullgraph={fullgraph}, dynamic={dynamic})"
    if vae:
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        what += "; VAE decode compiled"
    if mode == "reduce-overhead" and execution_device(pipe).type != "cuda":
        what += " (CUDA graphs need a GPU: on this device reduce-overhead compiles like default)"
    return what + "; the first call pays the compile time"
