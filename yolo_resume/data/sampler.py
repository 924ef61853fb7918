"""Epoch-keyed batch order: a pure function of (seed, epoch), resumable at any batch for free."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

_ORDER_STREAM = 0x0DE2  # spawn-key tag of the order (items use another tag)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch; depends on nothing but its arguments."""
    ss = np.random.SeedSequence(seed % 2**64, spawn_key=(_ORDER_STREAM, epoch))
    return np.random.default_rng(ss).permutation(num_samples)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of `(epoch, index)` keys for `DetectionDataset`, starting at `start_batch`.

    With `world_size` > 1 the order is padded by wrapping around to a multiple of world_size and cut
    into global batches of `batch_size * world_size` consecutive samples; rank r takes the r-th
    `batch_size` of each (the last, shorter global batch is split into equal parts alike). Global batch
    b then holds the same samples whatever the world size, every rank gets the same number of batches,
    and each rank's batch is a contiguous piece of the order: the mosaic partner windows of
    `DetectionDataset` (blocks of that order) stay inside one rank's batch when batch_size is a
    multiple of the window. A larger window (the default 128) spans the batches of several ranks; each
    rank then decodes for itself the partners its batches draw from the other ranks' positions.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)

    def batches_per_epoch(self) -> int:
        n = self.per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0 or not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_batch <= {self.batches_per_epoch()}, got {epoch}, {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample order for `epoch` (all batches, including skipped ones)."""
        order = epoch_permutation(self.num_samples, self.seed, epoch) if self.shuffle else np.arange(self.num_samples)
        per_rank, bs, ws = self.per_rank(), self.batch_size, self.world_size
        order = np.resize(order, per_rank * ws)  # np.resize pads by wrapping around
        full = per_rank // bs  # global batches of bs * ws samples; then one of ws * tail
        tail = per_rank - full * bs
        head = order[: full * bs * ws].reshape(full, ws, bs)[:, self.rank].reshape(-1)
        rest = order[full * bs * ws :]
        return np.concatenate([head, rest[self.rank * tail : (self.rank + 1) * tail]])

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, bs = self.epoch, self.batch_size
        order = self.indices(epoch)
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield [(epoch, int(i)) for i in order[b * bs : (b + 1) * bs]]
