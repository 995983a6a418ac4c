"""Memory (tier 2): offloading the weights to the CPU, VAE tiling and slicing, attention slicing.

The guide's "run on 4-6 GB GPUs" switches. Offloading moves weights between CPU and GPU memory, so it
needs a CUDA GPU; tiling and slicing trade time for a smaller peak on any device. Model offload moves
each model once per image; sequential offload every layer at every step (least memory, slowest);
group offload prefetches the next layers on a CUDA stream while the current ones run.
"""

from __future__ import annotations

import torch

from labkit.optimizations.registry import ATTENTION, LAYOUT, OFFLOAD, execution_device, optimization


@optimization(tier=2, stage=ATTENTION)
def attention_slicing(pipe, slice_size: str | int = "auto") -> str:
    """Attention computed a slice of heads at a time: less peak memory without SDPA, slower with it."""
    if slice_size != "auto" and not (isinstance(slice_size, int) and slice_size >= 1):
        raise ValueError(f"slice_size must be 'auto' or a whole number >= 1, not {slice_size!r}")
    pipe.enable_attention_slicing(slice_size)
    return f"attention processors -> SlicedAttnProcessor (slice_size={slice_size})"


@optimization(tier=2, stage=LAYOUT)
def vae_tiling(pipe) -> str:
    """Decode (and encode) the image in overlapping tiles, so large images fit: `pipe.vae.enable_tiling()`."""
    pipe.vae.enable_tiling()
    return "VAE decodes in tiles (pipe.vae.use_tiling = True)"


@optimization(tier=2, stage=LAYOUT)
def vae_slicing(pipe) -> str:
    """Decode a batch one image at a time: `pipe.vae.enable_slicing()`."""
    pipe.vae.enable_slicing()
    return "VAE decodes one image of the batch at a time (pipe.vae.use_slicing = True)"


@optimization(tier=2, stage=OFFLOAD, needs=("cuda",))
def model_cpu_offload(pipe) -> str:
    """Keep each model in CPU memory and move it to the GPU only while it runs (accelerate hooks).

    Costs one transfer of each model per image; `sequential_cpu_offload` saves more memory, far slower.
    """
    pipe.enable_model_cpu_offload(device=execution_device(pipe))
    return "text encoder, UNet and VAE live on the CPU; each moves to the GPU while it runs"


@optimization(tier=2, stage=OFFLOAD, needs=("cuda",))
def sequential_cpu_offload(pipe) -> str:
    """Move each layer's weights to the GPU only while that layer runs: least memory, slowest."""
    pipe.enable_sequential_cpu_offload(device=execution_device(pipe))
    return "every layer's weights live on the CPU and stream to the GPU layer by layer"


OFFLOAD_TYPES = ("leaf_level", "block_level")


@optimization(tier=2, stage=OFFLOAD, needs=("cuda",))
def group_offload(pipe, use_stream: bool = True, offload_type: str = "leaf_level") -> str:
    """Group offloading: groups of layers move to the GPU ahead of use, overlapped on a CUDA stream."""
    if offload_type not in OFFLOAD_TYPES:
        raise ValueError(f"offload_type must be one of {', '.join(OFFLOAD_TYPES)}, not {offload_type!r}")
    pipe.enable_group_offload(
        onload_device=execution_device(pipe),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        use_stream=use_stream,
    )
    return f"weights live on the CPU and are prefetched by {offload_type} groups (use_stream={use_stream})"
