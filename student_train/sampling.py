"""Which samples each rank sees, in which order, and every random choice made for a sample.

All randomness of the data pipeline is a pure function of ``(seed, epoch, index)``: the epoch's
order, the replay view of a sample, its RandomResizedCrop box, flip and AutoAugment ops. So the
result does not depend on the number of DataLoader workers or on which rank loads a sample, and a
resumed run at epoch e sees exactly what an uninterrupted run sees (the sampler "position" is the
epoch number -- checkpoints are taken between epochs).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

# Distinct streams so that, e.g., the view choice and the crop box of a sample are independent.
_ORDER, _VIEW, _AUGMENT = 0x5EED0, 0x5EED1, 0x5EED2


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for a sample's augmentation in an epoch (crop box, flip, AutoAugment)."""
    return np.random.default_rng([_AUGMENT, seed, epoch, index])


def replay_view(seed: int, epoch: int, index: int, num_views: int) -> int:
    """The stored view (0 .. num_views-1) that sample ``index`` replays in ``epoch``.

    >>> replay_view(0, 3, 17, 4) == replay_view(0, 3, 17, 4)
    True
    """
    if num_views == 1:
        return 0
    return int(np.random.default_rng([_VIEW, seed, epoch, index]).integers(num_views))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(num_samples)`` that depends only on (seed, epoch)."""
    return np.random.default_rng([_ORDER, seed, epoch]).permutation(num_samples)


class ShardedSampler(Sampler):
    """Disjoint, deterministic per-rank samples, like ``DistributedSampler`` without padding.

    Training (``shuffle=True``): each epoch the samples are permuted from (seed, epoch) and the
    first ``world_size * (n // world_size)`` are dealt round-robin, so the ranks see disjoint
    samples and the same count (DDP needs equal step counts); the few left over change every
    epoch. Evaluation (``shuffle=False``): rank r takes rows r, r + world, ... -- every sample
    exactly once, counts may differ by one.

    Iterating yields ``(epoch, index)`` pairs: the dataset needs the epoch for the sample's
    random choices, and carrying it in the key (rather than a ``set_epoch`` on the dataset)
    stays right with persistent workers.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("no samples to iterate over")
        if shuffle and num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} processes")
        self.num_samples = num_samples
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in order."""
        if not self.shuffle:
            return np.arange(self.rank, self.num_samples, self.world_size)
        order = epoch_order(self.num_samples, self.seed, self.epoch)
        usable = (self.num_samples // self.world_size) * self.world_size
        return order[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, int(i)) for i in self.indices()])

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.num_samples, self.world_size))
        return self.num_samples // self.world_size
