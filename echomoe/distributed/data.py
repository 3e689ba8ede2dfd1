"""Each rank reads its shard of the global batch.

With ``P`` data-parallel ranks, global step ``i`` of epoch ``t`` consists of the batches
``i * P, i * P + 1, ..., i * P + P - 1`` of the underlying batch source; rank ``r`` reads batch
``i * P + r`` (and nothing else: an :class:`~echomoe.train.batches.IndexedBatches` collates only
its own items).  A one-process run with ``grad_accum = P`` micro-batches therefore sees exactly
the same global batch, which is what makes the distributed and single-process runs comparable.
An epoch ends at its last *complete* group of ``P`` batches, so every rank takes the same number
of steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator


class ShardedBatches:
    """Rank ``rank``'s view of a batch source (anything with ``iterate(epoch, start)``).

    Args:
        source: the batch source every rank would read in a single-process run.
        rank: this rank's index among the ``world_size`` data-parallel ranks.
        world_size: ``P``.
    """

    def __init__(self, source, *, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.source, self.rank, self.world_size = source, int(rank), int(world_size)
        if hasattr(source, "batch") and hasattr(source, "__len__") and len(self) == 0:
            raise ValueError(f"the batch source has {len(source)} batches per epoch, fewer "
                             f"than the {world_size} ranks")

    def __len__(self) -> int:
        return len(self.source) // self.world_size

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's batches ``start, start + 1, ...`` of ``epoch``."""
        if hasattr(self.source, "batch") and hasattr(self.source, "__len__"):
            return (self.source.batch(epoch, i * self.world_size + self.rank)
                    for i in range(start, len(self)))
        return self._from_stream(epoch, start)

    def _from_stream(self, epoch: int, start: int) -> Iterator[dict]:
        stream = self.source.iterate(epoch, start * self.world_size)
        while True:
            group = list(itertools.islice(stream, self.world_size))
            if len(group) < self.world_size:
                return
            yield group[self.rank]
