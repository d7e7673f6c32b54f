"""The order in which training items are read: resumable, sharded by process, endless.

:class:`ResumableBatchSampler` derives item keys ``(index, aug_seed)`` from (seed, epoch,
position), so a run resumed at micro-batch k sees exactly the batches an uninterrupted run
would. :func:`make_loader` wraps it in a DataLoader whose workers survive a scheduler's SIGTERM.
"""
from __future__ import annotations

import signal
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from modules.core.seeding import mix_seed
from modules.errors import DataError


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless micro-batches of ``(index, aug_seed)`` for one process.

    Epoch e is a permutation drawn from ``torch.Generator`` seeded by (seed, e); each step
    takes ``batch_size * world_size`` consecutive items of it (the last incomplete global
    batch is dropped) and process ``rank`` takes its contiguous slice. ``start_batch``
    micro-batches are skipped, so a resumed run continues with exactly the batches an
    uninterrupted run would have seen. Augmentation seeds come from (seed, epoch, position).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        if batch_size < 1 or world_size < 1 or start_batch < 0:
            raise DataError(f"batch sampler: need batch_size >= 1, world_size >= 1, start_batch >= 0 "
                            f"(got {batch_size}, {world_size}, {start_batch})")
        if not 0 <= rank < world_size:
            raise DataError(f"batch sampler: rank {rank} is not in [0, {world_size})")
        if num_items < batch_size * world_size:
            raise DataError(f"the data set has {num_items} images, fewer than one global batch of "
                            f"{batch_size * world_size} (batch size {batch_size} x {world_size} "
                            "processes); lower train.batch_size or add images")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_items // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start_batch
        epoch, order = -1, None
        while True:
            batch_epoch, step = divmod(batch, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, order = batch_epoch, self.permutation(batch_epoch).tolist()
            start = step * self.global_batch + self.rank * self.batch_size
            yield [(order[p], mix_seed(self.seed, epoch, p)) for p in range(start, start + self.batch_size)]
            batch += 1


def held_out(total: int, n: int) -> np.ndarray:
    """``n`` positions of ``total`` spread evenly (bin centres): a validation split in which every part of
    the data set (every class of a class-folder data set) is represented."""
    return (2 * np.arange(n, dtype=np.int64) + 1) * total // (2 * max(n, 1))


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM goes to the whole process group: workers must not die of it
    before the main process has saved its checkpoint (they exit when it does)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _as_read(batch):
    """The collate step of a data set that reads whole batches itself: nothing to do."""
    return batch


def make_loader(dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1, start_batch: int = 0, num_workers: int = 0,
                pin_memory: Optional[bool] = None) -> DataLoader:
    """An endless DataLoader over ``dataset`` (items keyed by ``(index, aug_seed)``) in
    :class:`ResumableBatchSampler` order. A data set that reads whole batches (``__getitems__``
    returning one dict of stacked tensors, as the latent store does) is given its batches as they are.

    Do not pass it through ``accelerator.prepare``: it is already sharded by rank.
    """
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_batch)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_as_read if hasattr(dataset, "__getitems__") else None,
        num_workers=num_workers,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
    )
