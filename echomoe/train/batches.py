"""Batch sources of the training loop: ``(epoch, position) -> batch``, resumable exactly.

A batch source has ``iterate(epoch, start)`` giving batches ``start, start + 1, ...`` of
``epoch``.  :class:`IndexedBatches` permutes a random-access dataset with
``default_rng([seed, epoch])``; :class:`MultiTaskBatches` also draws each sample's task with
:class:`~echomoe.data.collate.TaskTransform` (key ``(epoch, sample id)``), so a batch depends
only on ``(seed, epoch, position)`` and a resumed run sees exactly the batches the uninterrupted
run would have seen.  :class:`FactoryBatches` wraps a plain callable ``epoch -> iterable of
batches`` (fast-forwarded on resume, so it must be deterministic in ``epoch``).
:class:`BatchCursor` is the loop's position in a source (saved in every checkpoint).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class IndexedBatches:
    """Batches of a random-access ``dataset`` with a per-epoch permutation.

    Batch ``index`` of ``epoch`` holds the items at positions ``index * batch_size ...`` of
    ``default_rng([seed, epoch]).permutation(len(dataset))`` (or of ``range`` without
    ``shuffle``), passed through ``collate_fn``.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__(int)``.
        collate_fn: list of items -> batch dict of tensors.
        batch_size: items per batch.
        seed: permutation seed.
        shuffle: permute per epoch.
        drop_last: drop the last incomplete batch of an epoch.
    """

    def __init__(self, dataset, *, collate_fn: Callable[[list], dict], batch_size: int,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} items make no batch of {batch_size}"
                             + (" (drop_last=True)" if drop_last else ""))
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset positions in the order of ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order = (epoch, self.arrange(order, epoch))
        return self._order[1]

    def arrange(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Rearrange the positions of ``epoch`` before they are cut into batches (a hook for
        subclasses; here unchanged)."""
        return order

    def item(self, position: int, epoch: int) -> Any:
        """One dataset item (override to transform items per epoch)."""
        return self.dataset[position]

    def batch(self, epoch: int, index: int) -> dict:
        """Batch ``index`` of ``epoch``."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        chosen = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return self.collate_fn(self.prepare([self.item(int(i), epoch) for i in chosen], epoch))

    def prepare(self, items: list, epoch: int) -> list:
        """Change a batch's items before they are collated (a hook for subclasses; here
        unchanged)."""
        return items

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches ``start, start + 1, ...`` of ``epoch``."""
        return (self.batch(epoch, i) for i in range(start, len(self)))


class MultiTaskBatches(IndexedBatches):
    """Multi-task batches from :class:`~echomoe.data.schema.UltrasoundSample` objects.

    Each sample's task is drawn by a :class:`~echomoe.data.tasks.TaskSampler` with the given
    sampling ``rates`` (relative weights) through
    :class:`~echomoe.data.collate.TaskTransform` with key ``(epoch, crc32(sample id))``; the
    items go through ``collator`` (a :class:`~echomoe.data.collate.VLMCollator`).  Samples that
    support none of the tasks with a positive rate are left out (``skipped`` counts them).

    With ``group_by_length`` (as ``transformers``' ``group_by_length``), each epoch's
    permutation is cut into windows of ``group_window`` batches; a window's samples are sorted
    by sequence length (``collator.sequence_length(item)``, the tokens of this epoch's task)
    and cut into batches, and the epoch's full batches are shuffled.  Batches then hold
    samples of similar length, so far less padding, while every sample is still seen once
    per epoch in an order that depends only on ``(seed, epoch)``; an incomplete last batch
    stays last.  Windows of a few batches (the default, 4) keep some task mix in a batch.

    Grouping changes what a batch holds, not only its padding: a grouped batch holds fewer
    tasks, which in the demo cost the MoE variants quality (see the README) while the dense
    model was unaffected.  Off by default.

    With ``pack_turns``, each row's padding is filled with further turns about the same image
    (:meth:`~echomoe.data.tasks.TaskSampler.follow_ups`, in their random order, each turn that
    still fits): a row grows up to the batch's longest row and no further, so the batch's shape
    and cost barely change while short rows (a VQA answer next to a 150-token report) carry
    several supervised targets instead of padding.  The first turn of every row is the one
    drawn with ``rates``, exactly as without packing (evaluation prompts are single-turn).
    """

    def __init__(self, samples: Sequence, *, collator: Callable[[list], dict],
                 rates: Mapping[str, float], batch_size: int, seed: int = 0,
                 drop_last: bool = True, group_by_length: bool = False,
                 group_window: int = 4, pack_turns: bool = False):
        from echomoe.data.collate import TaskTransform
        from echomoe.data.tasks import TaskSampler

        for option, on, needs in (("group_by_length", group_by_length, "sequence_length"),
                                  ("pack_turns", pack_turns, "turn_length")):
            if on and not callable(getattr(collator, needs, None)):
                raise TypeError(f"{option} needs a collator with {needs}() (e.g. VLMCollator); "
                                f"got {type(collator).__name__}")
        if group_window < 1:
            raise ValueError(f"group_window must be >= 1 batch, got {group_window}")
        sampler = TaskSampler(rates, seed=seed)
        kept = [s for s in samples if sampler.supported(s)]
        self.skipped = len(samples) - len(kept)
        if not kept:
            raise ValueError(f"none of the {len(samples)} samples supports a task with a "
                             f"positive rate in {dict(rates)}")
        self.transform = TaskTransform(sampler)
        self.group_by_length = group_by_length
        self.group_window = int(group_window)
        self.pack_turns = pack_turns
        super().__init__(kept, collate_fn=collator, batch_size=batch_size, seed=seed,
                         drop_last=drop_last)

    def item(self, position: int, epoch: int) -> dict:
        self.transform.set_epoch(epoch)
        return self.transform.example(self.dataset[position])

    def prepare(self, items: list[dict], epoch: int) -> list[dict]:
        """With ``pack_turns``: ``items`` with ``"turns"`` that fill each row up to the longest
        row (see the class docstring)."""
        if not self.pack_turns:
            return items
        from echomoe.data.tasks import TaskExample

        collator, sampler = self.collate_fn, self.transform.sampler
        lengths = [collator.sequence_length(item) for item in items]
        longest = max(lengths)
        for item, length in zip(items, lengths, strict=True):
            sample = item["sample"]
            first = TaskExample(item["task"], item["prompt"], item["target"])
            turns = []
            for turn in sampler.follow_ups(sample, first, key=self.transform.key(sample, epoch)):
                extra = collator.turn_length(turn.prompt, turn.target)
                if length + extra <= longest:
                    turns.append((turn.prompt, turn.target))
                    length += extra
            item["turns"] = turns
        return items

    def arrange(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Group by length when asked (see the class docstring)."""
        if not self.group_by_length:
            return order
        bs = self.batch_size
        full, rest = np.split(order, [len(order) // bs * bs])
        length_of = self.collate_fn.sequence_length
        lengths = np.array([length_of(self.item(int(i), epoch)) for i in full])
        window = self.group_window * bs
        batches = []
        for start in range(0, len(full), window):
            by_length = np.argsort(-lengths[start:start + window], kind="stable")
            batches.extend(np.split(full[start:start + window][by_length],
                                    len(by_length) // bs))
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return np.concatenate([*(batches[i] for i in shuffle), rest])


class FactoryBatches:
    """Wrap ``factory(epoch) -> iterable of batches``; resuming skips the consumed batches
    (so ``factory`` must give the same batches for the same epoch)."""

    def __init__(self, factory: Callable[[int], Iterable[dict]]):
        self.factory = factory

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches ``start, start + 1, ...`` of ``factory(epoch)`` (the first ``start`` are
        drawn and dropped)."""
        return itertools.islice(iter(self.factory(epoch)), start, None)


def as_batch_source(batches) -> IndexedBatches | FactoryBatches:
    """An object with ``iterate(epoch, start)``: batch sources pass through, a callable
    becomes :class:`FactoryBatches`."""
    if hasattr(batches, "iterate"):
        return batches
    if callable(batches):
        return FactoryBatches(batches)
    raise TypeError("train_batches must be a batch source (IndexedBatches / MultiTaskBatches) "
                    f"or a callable epoch -> iterable of batches, got {type(batches).__name__}")


class BatchCursor:
    """Position ``(epoch, index)`` in a batch source: ``index`` batches of ``epoch`` are
    consumed; :meth:`next` moves on to the next epoch when one is exhausted."""

    def __init__(self, source, epoch: int = 0, index: int = 0):
        self.source, self.epoch, self.index = source, int(epoch), int(index)
        self._it: Iterator[dict] | None = None

    def state(self) -> dict[str, int]:
        """``{"epoch", "index"}``: what a checkpoint saves to resume at the same batch."""
        return {"epoch": self.epoch, "index": self.index}

    def next(self) -> dict:
        """The next batch (a ``ValueError`` when a whole epoch yields none)."""
        for _ in range(2):
            if self._it is None:
                self._it = self.source.iterate(self.epoch, self.index)
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    break
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
                continue
            self.index += 1
            return batch
        raise ValueError(f"the batch source yielded no batch for epoch {self.epoch}")
