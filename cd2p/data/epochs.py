"""Datasets whose items are drawn afresh every epoch and still resume exactly.

A scene task draws a new random subset (or crop) of each scene every epoch. To keep training
deterministic, an item is a pure function of ``(seed, epoch, index)``: the trainer's sampler
hands such a dataset :class:`EpochIndex` keys instead of plain indices, so the draw does not
depend on which DataLoader worker makes it, nor on whether the run was interrupted and resumed
(no generator state has to be saved).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset


class EpochIndex(NamedTuple):
    """The key of one item of an :class:`EpochDataset`: the epoch and the sample index."""

    epoch: int
    index: int


class EpochDataset(Dataset):
    """Base of datasets whose item ``index`` differs from epoch to epoch.

    Subclasses implement :meth:`item`; ``dataset[i]`` (a plain index) is epoch 0's item, and
    ``dataset[EpochIndex(epoch, i)]`` the item of that epoch. :attr:`seed` is the run's seed.
    """

    fresh_each_epoch = True
    seed: int = 0

    def item(self, epoch: int, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        """The generator of one item: a pure function of ``(seed, epoch, index)``."""
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, key: EpochIndex | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        return self.item(epoch, index)


__all__ = ["EpochDataset", "EpochIndex"]
