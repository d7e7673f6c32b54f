"""The one scaled-dot-product attention used by every attention layer (UNet and VAE).

``attention(q, k, v)`` takes and returns ``[B, heads, N, head_dim]`` tensors (SDPA layout).
Backend: xformers ``memory_efficient_attention`` when it imports and a one-time probe on the
actual device type and dtype succeeds and agrees with SDPA; otherwise PyTorch's
``scaled_dot_product_attention``. CPU always uses SDPA, and ``LDM_ATTENTION=sdpa`` forces it.
The probe matters because an xformers wheel built for another torch/CUDA can import fine
and then raise on every call (see shared/ANCHORS.md).

Forward-mode autodiff (the MeanFlow objective's Jacobian-vector product) passes only through
SDPA's math backend: in torch 2.13 the fused kernels, flash and memory-efficient on CUDA, cuDNN,
and the flash kernel SDPA picks on CPU, have no forward-mode formula ("Trying to use forward AD
with _scaled_dot_product_flash_attention_for_cpu that does not support it"), and xformers'
kernels have none either. Inside :func:`forward_ad_attention` every call takes the math path.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

SDPA = "sdpa"
XFORMERS = "xformers"

_backends: dict[tuple[str, torch.dtype], str] = {}
_memory_efficient_attention = None   # xformers' function, set once a probe has passed
_math_only = False                   # inside forward_ad_attention()


def _xformers_capable(device: torch.device) -> bool:
    """Devices xformers kernels can run on (CUDA and ROCm both report type 'cuda')."""
    return device.type == "cuda"


def _import_memory_efficient_attention():
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # missing, or a wheel built for another torch: both mean "not usable"
        return None
    return memory_efficient_attention


def _probe_xformers(device: torch.device, dtype: torch.dtype) -> bool:
    """Run one tiny xformers call and check it against SDPA; any failure means "don't use it"."""
    memory_efficient_attention = _import_memory_efficient_attention()
    if memory_efficient_attention is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 16, 32, generator=gen).to(device, dtype) for _ in range(3))
        out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        agrees = bool(torch.allclose(out.transpose(1, 2).float(), ref, atol=2e-2, rtol=2e-2))
    except Exception as e:
        logger.info("xformers probe on %s/%s failed (%s: %s)", device.type, dtype, type(e).__name__, e)
        return False
    if not agrees:
        logger.warning("xformers probe on %s/%s disagrees with SDPA; not using xformers", device.type, dtype)
        return False
    global _memory_efficient_attention
    _memory_efficient_attention = memory_efficient_attention
    return True


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """``"xformers"`` or ``"sdpa"``: the backend :func:`attention` uses for this device type and dtype.

    Under torch.compile this runs once at trace time and its answer is baked into the graph,
    so the probe and the cache lookup cause no graph break.
    """
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _backends:
        forced = os.environ.get("LDM_ATTENTION", "").strip().lower()
        if forced not in ("", SDPA):
            raise ValueError(f"environment variable LDM_ATTENTION={forced!r}: the only accepted value is 'sdpa'")
        use_xformers = not forced and _xformers_capable(device) and _probe_xformers(device, dtype)
        _backends[key] = XFORMERS if use_xformers else SDPA
        reason = " (forced by LDM_ATTENTION)" if forced else ""
        logger.info("attention backend for %s/%s: %s%s", device.type, dtype, _backends[key], reason)
    return _backends[key]


# What torch.compiler.assume_constant_result does, without importing torch._dynamo at import
# time (2.7 s of every script's start-up); tests/test_attention.py checks compile still works.
attention_backend._dynamo_marked_constant = True


def reset_attention_backends() -> None:
    """Forget the cached choices (e.g. after changing LDM_ATTENTION); the next call probes again."""
    global _memory_efficient_attention
    _backends.clear()
    _memory_efficient_attention = None


@contextmanager
def forward_ad_attention() -> Iterator[None]:
    """Within it, attention runs SDPA's math backend, the one forward-mode autodiff passes through
    (slower and more memory than the fused kernels: only the Jacobian-vector product needs it)."""
    global _math_only
    previous = _math_only
    _math_only = True
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _math_only = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over ``[B, heads, N, head_dim]`` tensors."""
    if not _math_only and attention_backend(q.device, q.dtype) == XFORMERS:
        out = _memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
