"""Haar wavelets: resampling ("Diffusion Probabilistic Model Made Slim", Yang et al., CVPR 2023) and
the multi-level wavelet loss of improved shortcut training (iSM, arXiv 2510.21250).

``dwt`` is the one-level orthonormal 2D Haar transform. Each 2x2 pixel block
``[[a, b], [c, d]]`` (a = x[2i, 2j], b = x[2i, 2j+1], c = x[2i+1, 2j], d = x[2i+1, 2j+1])
becomes four coefficients at (i, j):

    LL = (a + b + c + d) / 2     local average
    LH = (a + b - c - d) / 2     low-pass along x, high-pass along y (horizontal edges)
    HL = (a - b + c - d) / 2     high-pass along x, low-pass along y (vertical edges)
    HH = (a - b - c + d) / 2     diagonal detail

The 4x4 matrix is half a Hadamard matrix: symmetric and orthogonal, so ``idwt`` applies the
same matrix, reconstruction is exact and the energy (sum of squares) is preserved.

Channel layout (band-major): ``dwt`` maps ``[B, C, H, W]`` to ``[B, 4C, H/2, W/2]`` with
channels ``[0, C)`` = LL, ``[C, 2C)`` = LH, ``[2C, 3C)`` = HL, ``[3C, 4C)`` = HH, so
``out.view(B, 4, C, H/2, W/2)[:, k]`` is sub-band k of every input channel.

``wavelet_loss`` weights every sub-band of an L-level decomposition equally (see there): because
the transform is orthonormal, weighting each band by its number of coefficients would give back
the plain pixel MSE, so the per-band normalisation is the whole point.

``WaveletDownsample`` / ``WaveletUpsample`` are drop-in replacements for the strided-conv /
nearest-upsample-conv resamplers of the UNet and the VAE: a squeeze-excitation gate gives every
(sub-band, channel) pair its own weight in (0, 1) before the sub-bands are mixed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_BANDS = 4
BAND_NAMES = ("LL", "LH", "HL", "HH")


def _check_image(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")


def _haar(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 4x4 half-Hadamard butterfly; it is its own inverse, so dwt and idwt both apply it."""
    sum_ab, diff_ab, sum_cd, diff_cd = a + b, a - b, c + d, c - d
    return ((sum_ab + sum_cd) * 0.5, (sum_ab - sum_cd) * 0.5, (diff_ab + diff_cd) * 0.5, (diff_ab - diff_cd) * 0.5)


def dwt(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Haar DWT: ``[B, C, H, W]`` -> ``[B, 4C, H/2, W/2]`` (LL, LH, HL, HH blocks)."""
    _check_image(x, "dwt")
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"dwt: height and width must be even, got {h}x{w} (shape {tuple(x.shape)})")
    # pixel_unshuffle puts the 2x2 block of channel c at channels 4c + (0: a, 1: b, 2: c, 3: d).
    blocks = F.pixel_unshuffle(x, 2).view(b, c, NUM_BANDS, h // 2, w // 2)
    ll, lh, hl, hh = _haar(*blocks.unbind(2))
    return torch.cat([ll, lh, hl, hh], dim=1)


def idwt(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dwt`: ``[B, 4C, h, w]`` (LL, LH, HL, HH blocks) -> ``[B, C, 2h, 2w]``."""
    _check_image(bands, "idwt")
    if bands.shape[1] % NUM_BANDS:
        raise ValueError(f"idwt: channel count must be a multiple of 4 (LL, LH, HL, HH blocks), "
                         f"got shape {tuple(bands.shape)}")
    ll, lh, hl, hh = bands.chunk(NUM_BANDS, dim=1)
    top_left, top_right, bottom_left, bottom_right = _haar(ll, lh, hl, hh)
    b, c, h, w = ll.shape
    blocks = torch.stack([top_left, top_right, bottom_left, bottom_right], dim=2)
    return F.pixel_shuffle(blocks.view(b, c * NUM_BANDS, h, w), 2)


def wavelet_bands(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Sub-bands of a ``levels``-level Haar decomposition of ``[B, C, H, W]`` (H, W divisible by 2^levels):
    LH, HL, HH of level 1, then of level 2 (the transform of level 1's LL), ..., then the last LL."""
    bands, low = [], x
    for _ in range(levels):
        low, lh, hl, hh = dwt(low).chunk(NUM_BANDS, dim=1)
        bands += [lh, hl, hh]
    return bands + [low]


def wavelet_loss(error: torch.Tensor, levels: int) -> torch.Tensor:
    """iSM's multi-level wavelet loss of a prediction error ``[B, C, H, W]``, one value per row ``[B]``:
    the mean square of each of the ``3 levels + 1`` sub-bands of :func:`wavelet_bands`, averaged with
    equal weights. Per coefficient, a level-l detail band (and the final LL) then weighs 4^(l - 1) times
    as much as a level-1 one: coarse structure counts as much as the finest detail, where the pixel MSE
    (the same average weighted by band size) is dominated by level 1's three quarters of the coefficients."""
    per_band = [band.pow(2).flatten(1).mean(1) for band in wavelet_bands(error, levels)]
    return torch.stack(per_band, dim=1).mean(1)


class SubbandGate(nn.Module):
    """Squeeze-excitation gate: one sigmoid weight per (sub-band, channel) from global statistics.

    ``forward(bands)`` with ``bands`` of shape ``[B, 4C, h, w]`` returns ``bands * gate`` where
    ``gate = sigmoid(MLP(mean over h, w))`` has shape ``[B, 4C, 1, 1]``: every sub-band of every
    channel is weighted separately (the seed's version shared one gate across sub-bands, which
    reduces the transform to a gated pixel subsampling).
    """

    def __init__(self, band_channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(band_channels // reduction, 8)
        self.reduce = nn.Linear(band_channels, hidden)
        self.expand = nn.Linear(hidden, band_channels)

    def gates(self, bands: torch.Tensor) -> torch.Tensor:
        """The gate values, shape ``[B, 4C]``, band-major like the input channels."""
        pooled = bands.mean(dim=(2, 3))
        return torch.sigmoid(self.expand(F.silu(self.reduce(pooled))))

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        return bands * self.gates(bands)[:, :, None, None].to(bands.dtype)


class WaveletDownsample(nn.Module):
    """Halve the resolution: Haar DWT -> per-sub-band gate -> 3x3 conv from ``4 in_ch`` to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.gate = SubbandGate(NUM_BANDS * in_ch)
        self.conv = nn.Conv2d(NUM_BANDS * in_ch, out_ch, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.gate(dwt(x)))


class WaveletUpsample(nn.Module):
    """Double the resolution: 3x3 conv from ``in_ch`` to ``4 out_ch`` sub-bands -> gate -> inverse DWT."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.conv = nn.Conv2d(in_ch, NUM_BANDS * out_ch, kernel_size=3, padding=1)
        self.gate = SubbandGate(NUM_BANDS * out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return idwt(self.gate(self.conv(x)))
