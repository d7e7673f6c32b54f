"""Noise paired with data by optimal transport (``train.ot_pairing``): iSM's "scaling OT" (arXiv 2510.21250).

Minibatch OT (Pooladian et al. 2023, Tong et al. 2023) pairs the B noise draws of a batch with its
B data latents by the permutation that minimises the summed squared distance, so the straight
paths x_t cross less and the velocity field the network must learn is simpler. A batch of one
process is a small sample of both distributions; iSM pools several minibatches into one
assignment. Here the pool is ``train.ot_pool`` consecutive micro-batches of a process: their data
and noise are concatenated, paired by one exact assignment, and handed out again one micro-batch
at a time, each data latent keeping its place and condition. Both marginals are untouched
(every data latent and every noise draw is used once), only the coupling changes.

Within each class. Sampling draws the noise from N(0, I) whatever the condition, so training must
pair every condition with N(0, I) noise too. One assignment over a class-conditional pool does not:
it gives class c the draws nearest to class c's latents, a noise distribution of its own (on a
held-out 10-class check that made every step count worse than no pairing). A class-conditional pool
is therefore split by class: the noise drawn at the rows of class c (independent of the data, so
N(0, I)) is assigned among those rows only. Masks and prompts have no classes to split by, so the
config refuses ``train.ot_pairing`` with them; an unconditional pool is one assignment.

The assignment is exact, scipy.optimize.linear_sum_assignment on the host, once per pool: about 0.006 s
at 256 rows, 0.04 s at 512, 0.2 s at 1024 and 1.6 s at 2048 on one (loaded) CPU core, 15-22x faster than
the numpy Hungarian solver it replaced (BENCHMARKS.md, "OT pairing").
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from scipy.optimize import linear_sum_assignment


def assignment(cost: torch.Tensor) -> torch.Tensor:
    """For a square cost matrix, the column of each row in an assignment of minimal total cost."""
    _, column = linear_sum_assignment(cost.double().cpu().numpy())
    return torch.from_numpy(column)


def pair_noise(x1: torch.Tensor, noise: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``noise`` reordered so that row i goes with ``x1[i]``: the permutation of minimal summed squared
    distance ``sum_i ||x1_i - noise_i||^2``; with ``groups`` (a label per row), the minimal one that keeps
    every row's noise among the draws at the rows of its own group."""
    data, draws = x1.flatten(1).double().cpu(), noise.flatten(1).double().cpu()
    every = torch.arange(len(data))
    order = torch.empty_like(every)
    for rows in ([every] if groups is None else [torch.nonzero(groups.cpu() == g).flatten()
                                                 for g in torch.unique(groups.cpu())]):
        order[rows] = rows[assignment(torch.cdist(data[rows], draws[rows]).pow(2))]
    return noise[order.to(noise.device)]


MicroBatch = tuple[torch.Tensor, Optional[torch.Tensor]]     # (x1, condition)


class PairedPool:
    """Micro-batches with paired noise, pooled ``size`` at a time.

    ``load(m)`` gives micro-batch ``m``'s ``(x1, cond)`` (called once per micro-batch, in order from
    the first micro-batch of a pool: a resumed run starts its data at the pool's start);
    ``draw_noise(m, x1)`` its noise. ``pool(m)`` returns ``(x1, cond, noise)`` of micro-batch ``m``,
    building the pool that holds it on first use. ``by_class``: the conditions are class labels, and
    noise is paired within each class (module docstring).
    """

    def __init__(self, size: int, load: Callable[[int], MicroBatch],
                 draw_noise: Callable[[int, torch.Tensor], torch.Tensor], by_class: bool = False):
        self.size, self.load, self.draw_noise, self.by_class = size, load, draw_noise, by_class
        self.first: Optional[int] = None
        self.items: list[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = []

    def start(self, m: int) -> int:
        """The first micro-batch of the pool that holds micro-batch ``m``."""
        return m - m % self.size

    def __call__(self, m: int) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        first = self.start(m)
        if first != self.first:
            indices = range(first, first + self.size)
            batches = [self.load(i) for i in indices]
            noises = [self.draw_noise(i, x1) for i, (x1, _) in zip(indices, batches)]
            groups = torch.cat([cond for _, cond in batches]) if self.by_class else None
            paired = pair_noise(torch.cat([x1 for x1, _ in batches]), torch.cat(noises), groups)
            sizes = [x1.shape[0] for x1, _ in batches]
            self.items = [(x1, cond, noise) for (x1, cond), noise in zip(batches, paired.split(sizes))]
            self.first = first
        return self.items[m - first]
