"""Attention (tier 2): classic attention, PyTorch SDPA (optionally pinned to one kernel), xFormers.

Diffusers' default is PyTorch's ``scaled_dot_product_attention`` (SDPA), which picks a fused kernel
(flash, memory-efficient) per call; classic attention materialises ``softmax(QK^T)`` and is the
baseline's. Attention slicing lives with the memory switches (`labkit.optimizations.memory`).
"""

from __future__ import annotations

from labkit.optimizations.registry import ATTENTION, Unavailable, missing, optimization


@optimization(tier=0, stage=ATTENTION)
def classic_attention(pipe) -> str:
    """Classic attention (softmax(QK^T)V materialised in memory): the baseline's, before PyTorch SDPA."""
    from diffusers.models.attention_processor import AttnProcessor

    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor())
    return "attention processors -> AttnProcessor (classic, materialises the attention matrix)"


SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


class PinnedSDPAProcessor:
    """Diffusers' SDPA attention processor, with PyTorch SDPA restricted to one backend inside it."""

    def __init__(self, backend: str):
        from diffusers.models.attention_processor import AttnProcessor2_0
        from torch.nn.attention import SDPBackend

        self.backend = backend
        self.kernel = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[backend]
        self.processor = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.kernel):
            return self.processor(*args, **kwargs)


@optimization(tier=2, stage=ATTENTION)
def sdpa(pipe, backend: str | None = None) -> str:
    """PyTorch scaled_dot_product_attention (diffusers' default); optionally the UNet's pinned to one backend.

    Only the UNet is pinned: the VAE's single attention head is 512 wide, beyond the flash kernel's
    limit of 256, and its one attention layer is not what attention kernels are compared on.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend is not None and backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r}; choose one of {', '.join(SDPA_BACKENDS)}")
    if backend in ("efficient", "cudnn") and (problem := missing("cuda", pipe)):
        raise Unavailable(f"sdpa(backend={backend!r}): {problem}")
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if backend is None:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        return "attention processors -> AttnProcessor2_0 (PyTorch SDPA, backend chosen per call by PyTorch)"
    pipe.unet.set_attn_processor(PinnedSDPAProcessor(backend))
    return f"UNet attention -> PyTorch SDPA pinned to the {backend} backend; VAE attention -> SDPA"


@optimization(tier=2, stage=ATTENTION, needs=("cuda", "xformers"))
def xformers(pipe) -> str:
    """xFormers memory-efficient attention (the guide's; compare with SDPA, which replaced it)."""
    pipe.enable_xformers_memory_efficient_attention()
    return "attention processors -> XFormersAttnProcessor"
