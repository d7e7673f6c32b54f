"""Seeds and random streams: every random draw of a run is a pure function of its seed and its place.

Training: the noise, time and dropout draws of a micro-batch come from :func:`step_generator`
(seed, step, micro step, rank), so they do not depend on what ran before (logging, validation,
a resume): that is what makes an interrupted run finish with identical weights. Sampling: image
i's noise comes from :func:`image_seed` (seed, i), never from its batch. Data order and
augmentation are seeded by :func:`mix_seed` too. This module is the one place seeds are mixed.

Torch's CPU generator uses only the low 32 bits of a seed (``manual_seed(5)`` and
``manual_seed(5 + 2**32)`` draw alike), which the mixers here account for.
"""
from __future__ import annotations

from typing import Sequence

import torch

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15

SHARED_STREAM = -1  # ``rank`` of the stream every process draws alike (global-batch noise)
_SAMPLER_STREAM = 1  # stochastic samplers' per-image stream, apart from the initial noise
_PAIRED_NOISE_STREAM = 2   # train.ot_pairing's noise, apart from the micro-batch's own draws


def _splitmix64(z: int) -> int:
    z = (z + _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): nearby inputs give unrelated seeds.

    Every bit counts: a value outside [0, 2^64) is folded in 64 bits at a time, after a marker
    that keeps it apart from its 64-bit wrap-around.
    """
    state = _GOLDEN64
    for value in values:
        value = int(value)
        chunks = [value & _MASK64]
        if not 0 <= value <= _MASK64:
            rest = abs(value)
            chunks = [_MASK64 if value < 0 else _MASK64 - 1]
            while True:
                chunks.append(rest & _MASK64)
                rest >>= 64
                if not rest:
                    break
        for chunk in chunks:
            state = _splitmix64(state ^ chunk)
    return state >> 1


def _permute32(x: int) -> int:
    """A bijection of 32-bit integers that scrambles its input (xorshift-multiply, 'lowbias32')."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def image_seed(base_seed: int, index: int) -> int:
    """The 32-bit generator seed of image ``index``: a function of (base seed, index) only.

    Within one base seed, different images always get different seeds (a bijection of
    ``offset + index`` modulo 2^32, so 50 000 samples never repeat a noise), and every bit
    of the base seed counts, so seeds 0, 2^32 and 2^70 give unrelated images.
    """
    offset = mix_seed(base_seed) & _MASK32
    return _permute32((offset + int(index)) & _MASK32)


def step_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """Randomness of one micro-batch as a pure function of (seed, step, micro step, rank).

    Pass ``SHARED_STREAM`` as the rank for the stream all processes share; it never equals a
    process's own stream.
    """
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, micro_step, rank))


def paired_noise_generator(seed: int, step: int, micro_step: int, rank: int,
                           device: torch.device) -> torch.Generator:
    """The noise that ``train.ot_pairing`` pairs with micro-batch (step, micro step) of ``rank``."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, micro_step, rank, _PAIRED_NOISE_STREAM))


def process_share_randn(shape: tuple[int, ...], shared: torch.Generator, rank: int, world_size: int) -> torch.Tensor:
    """This process's rows of standard normal noise drawn for the whole global batch.

    ``shared`` must be seeded identically on every process. Each sample then gets the same
    noise whether the global batch runs on one process or is split over several.
    """
    full = torch.randn((world_size * shape[0], *shape[1:]), generator=shared, device=shared.device)
    return full[rank * shape[0]:(rank + 1) * shape[0]]


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(seeds), *shape] standard normal; row i drawn on CPU from Generator(seeds[i])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample for stochastic samplers, independent of initial_noise's."""
    return [torch.Generator().manual_seed(mix_seed(s, _SAMPLER_STREAM)) for s in seeds]
