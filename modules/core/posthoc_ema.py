"""Post-hoc EMA (Karras et al., EDM2, "Analyzing and Improving the Training Dynamics of Diffusion
Models", arXiv 2312.02696, section 3 and appendix C): power-function EMAs, and the least-squares
combination of their snapshots that gives the EMA of another length after training.

A power-function EMA at time t (t updates done) averages the weights of the whole run with the
profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its length is sigma_rel, the
profile's standard deviation relative to t (eq. 123). Tracked with the decay
beta_t = (1 - 1/t)^(gamma + 1) (eq. 127; t counts updates, as EDM2's counts images), update k of t
gets exactly the profile's mass on (k - 1, k], so the discrete average is the continuous one of a
trajectory that holds each update's weights for one unit of time. Any profile's average can then
be approximated from snapshots of such EMAs: the combination of snapshot profiles closest to it in
L2 (the inner products of eq. 151; Algorithm 3) applied to the snapshot weights.

Pure math and the tracker; the snapshots' files are modules/run/posthoc.py's.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from modules.core.ema import EMA

# gamma -> 0 gives the flattest power profile (a plain average of the whole run): sigma_rel = 1/sqrt(12)
SIGMA_REL_LIMIT = 12 ** -0.5


def sigma_rel_problem(value: float) -> Optional[str]:
    """Why ``value`` is not a power-function EMA length, or None (a config rule)."""
    ok = isinstance(value, (int, float)) and 0 < value < SIGMA_REL_LIMIT
    return None if ok else f"must be an EMA length sigma_rel in (0, {SIGMA_REL_LIMIT:.4f}), got {value!r}"


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power profile of exponent ``gamma`` (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose profile has length ``sigma_rel``: eq. 123 solved for gamma, a cubic
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0, whose largest real root it is."""
    inverse = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def profile_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """The inner products <p_a, p_b> = integral of p_a(tau) p_b(tau) over the shorter support [0, min(t_a, t_b)]
    of power profiles (broadcast elementwise; float64): (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1)
    times min^(gamma_a + gamma_b + 1) / (t_a^(gamma_a + 1) t_b^(gamma_b + 1)), written as ratios of t
    (never above 1) so that large times do not overflow."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    shorter = np.minimum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * (shorter / t_a) ** (gamma_a + 1) * (shorter / t_b) ** (gamma_b + 1) / shorter


def reconstruction(t: Sequence[float], sigma_rels: Sequence[float], t_out: float,
                   sigma_rels_out: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients of the snapshots (taken at times ``t`` by EMAs of lengths ``sigma_rels``) whose sum is
    the EMA of each length of ``sigma_rels_out`` at ``t_out``: the least-squares fit of the target profile by
    the snapshots' profiles (EDM2 Algorithm 3), scaled to sum to 1 (an average of weights). Returns
    ([snapshots, outputs] coefficients, each output's relative L2 error of its fitted profile)."""
    t = np.asarray(t, dtype=np.float64)
    gamma = np.array([gamma_of(s) for s in sigma_rels])
    gamma_out = np.array([gamma_of(s) for s in sigma_rels_out])
    gram = profile_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    target = profile_products(t[:, None], gamma[:, None], t_out, gamma_out[None, :])
    coefficients = np.linalg.solve(gram, target)
    coefficients = coefficients / coefficients.sum(axis=0, keepdims=True)
    # |fit - p|^2 = x'Gx - 2x'b + |p|^2, relative to |p|^2
    norm = profile_products(t_out, gamma_out, t_out, gamma_out)
    residual = (np.einsum("io,ij,jo->o", coefficients, gram, coefficients)
                - 2 * np.einsum("io,io->o", coefficients, target) + norm)
    return coefficients, np.sqrt(np.maximum(residual, 0) / norm)


class PowerEMA(EMA):
    """The power-function EMA of length ``sigma_rel``: an :class:`EMA` (the same shadow, sharding, swapping,
    skipped steps and state dict) whose update n (n updates done so far, t = n + 1 after it) gives the
    current weights 1 - beta_t = 1 - (1 - 1/t)^(gamma + 1): all of it at the first update. The weight is
    computed in float64 on the device: 1 - 1/t in float32 keeps few of 1/t's digits (at t = 10^5 the weight
    would be off by up to 0.3 %)."""

    def __init__(self, model: nn.Module, sigma_rel: float, root: Optional[nn.Module] = None):
        problem = sigma_rel_problem(sigma_rel)
        if problem:
            raise ValueError(f"power-function EMA: sigma_rel {problem}")
        super().__init__(model, decay=0.0, warmup=False, root=root)
        self.sigma_rel = float(sigma_rel)
        self.gamma = gamma_of(self.sigma_rel)

    def _weight64(self) -> torch.Tensor:
        t = self.count.double() + 1
        return -torch.expm1((self.gamma + 1) * torch.log1p(-1 / t))

    def _weight(self) -> torch.Tensor:
        return self._weight64().float()

    def _decay(self) -> torch.Tensor:
        return 1 - self._weight64()
