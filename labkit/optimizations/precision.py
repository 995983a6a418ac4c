"""Precision (tier 1): half-precision weights and activations, and TF32 matmuls for fp32 models."""

from __future__ import annotations

import torch

from labkit.optimizations.registry import PRECISION, optimization


def _cast(pipe, dtype: torch.dtype) -> str:
    from labkit.models import quiet_diffusers

    before = pipe.unet.dtype
    with quiet_diffusers():  # its note on casting with to() concerns modules kept in fp32; ours have none
        pipe.to(dtype=dtype)
    return f"weights and activations {before} -> {dtype}"


@optimization(tier=1, stage=PRECISION)
def fp16(pipe) -> str:
    """Half precision (float16) weights and activations, the guide's FP16."""
    return _cast(pipe, torch.float16)


@optimization(tier=1, stage=PRECISION)
def bf16(pipe) -> str:
    """bfloat16 weights and activations: fp32's range at fp16's size, so no overflow to guard."""
    return _cast(pipe, torch.bfloat16)


@optimization(tier=1, stage=PRECISION, needs=("cuda",))
def tf32(pipe) -> str:
    """TensorFloat-32 matmuls and convolutions for fp32 models (a process-wide switch)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "fp32 matmuls and convolutions use TF32 tensor cores (for the whole process)"
