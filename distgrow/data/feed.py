"""Training micro-batches of a :class:`LoaderDataset`, read ahead by a ``DataLoader``.

In-memory sets are batched by indexing (``ArrayDataset.batch``). A set read sample by sample
(an image folder, or any set with ``data.feed=loader``) goes through a
``torch.utils.data.DataLoader`` with worker processes and prefetching, driven by a batch
sampler that yields this rank's micro-batches of the rest of the epoch in the order the loop
will ask for them (the trainer uses :class:`distgrow.loop.GrowthBatchSampler`: one permutation
per epoch, the same global batches however they are realised, growth at update boundaries, a
resume anywhere in an epoch at any world size).

The loop still says which samples it wants: :meth:`LoaderFeed.batch` takes the micro-batch's
indices, as ``ArrayDataset.batch`` does, and checks them against what the loader read. If the
loop asked for something else (the run went another way than the sampler planned, e.g. an
elastic job split a batch otherwise), the feed reads in this process for the rest of the
epoch: slower, never wrong. The transform runs on the stored samples, as for the in-memory
set, so both paths give the same tensors bit for bit; on a GPU the loader's pinning thread
pins the stored (``uint8``) batches, they cross without blocking, and the transform runs on
the device (``device``), not in the loop's thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Sampler

from distgrow.data.containers import DatasetFormatError, LoaderDataset, to_device

__all__ = ["LoaderFeed", "loader_batches", "one_line"]

_T = TypeVar("_T")


def one_line(err: DatasetFormatError) -> DatasetFormatError:
    """``err`` as its one line, when a loader worker raised it.

    A ``DataLoader`` re-raises a worker's exception with the worker's whole traceback as its
    message (``Caught DatasetFormatError in DataLoader worker process 0. Original Traceback
    ...``); the user gets the line the same error says with 0 workers: the file and the fix.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return err
    name = f"\n{type(err).__module__}.{type(err).__qualname__}: "
    at = text.rfind(name)
    said = text[at + len(name) :] if at >= 0 else text.strip().splitlines()[-1]
    return type(err)(" ".join(said.split()))


def loader_batches(loader: Iterable[_T]) -> Iterator[_T]:
    """The batches of ``loader``; a data error in a worker arrives as its one line."""
    try:
        yield from loader
    except DatasetFormatError as err:
        raise one_line(err) from None


class _Recording(Sampler[list[int]]):
    """The non-empty micro-batches of ``inner``, each noted in ``issued`` as it is handed to
    the loader (so the feed knows which samples each batch it yields holds)."""

    def __init__(self, inner: Iterable[list[int]], issued: deque[list[int]]) -> None:
        self.inner = inner
        self.issued = issued

    def __iter__(self) -> Iterator[list[int]]:
        # Plan now (a schedule that cannot plan raises here, in LoaderFeed.start), not at the
        # first batch.
        return self._record(iter(self.inner))

    def _record(self, batches: Iterator[list[int]]) -> Iterator[list[int]]:
        # Empty micro-batches (the tail of an epoch's last batch) are made in the loop's process.
        for indices in batches:
            if indices:
                self.issued.append(indices)
                yield indices


class LoaderFeed:
    """This rank's training micro-batches of ``dataset``, read ahead by worker processes.

    Args:
        dataset: The training set, read sample by sample.
        batch_sampler: Re-iterable; each ``iter()`` yields the micro-batches (lists of indices)
            the loop will ask for from now to the end of the epoch, in order.
        workers: Loader worker processes (0: read in this process, still in order).
        pin_memory: Pin each batch in page-locked memory (faster copies to a GPU): the
            ``DataLoader`` does it in its own thread.
        prefetch_factor: Micro-batches each worker reads ahead.
        device: Where batches go and are transformed (default: stay on the host).
    """

    def __init__(
        self,
        dataset: LoaderDataset,
        batch_sampler: Iterable[list[int]],
        *,
        workers: int,
        pin_memory: bool,
        prefetch_factor: int,
        device: torch.device | None = None,
    ) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.device = device or torch.device("cpu")
        self._issued: deque[list[int]] = deque()
        self.loader: DataLoader[Any] = DataLoader(
            dataset.samples,
            batch_sampler=_Recording(batch_sampler, self._issued),
            num_workers=workers,
            prefetch_factor=prefetch_factor if workers > 0 else None,
            # One set of workers for the whole run, not one per epoch.
            persistent_workers=workers > 0,
            # Pinned in the loader's thread, not the loop's (a no-op without CUDA).
            pin_memory=pin_memory and torch.cuda.is_available(),
        )
        self._batches: Iterator[Any] | None = None
        self.read_here = 0
        """Micro-batches read in this process because the loader had not planned them."""

    def start(self) -> None:
        """Plan anew from where the loop stands (call at the start of each epoch's updates)."""
        self._issued.clear()
        try:
            self._batches = iter(self.loader)
        except ValueError:
            # The sampler cannot plan this epoch on this job (a schedule error): read here.
            self._batches = None

    def batch(self, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed ``(x, y)`` of the micro-batch ``indices`` (as ``ArrayDataset.batch``).

        Taken from the loader when it read exactly these samples next, else read here.
        """
        wanted = indices.tolist()
        pair = self._next(wanted) if wanted else None
        if pair is None:
            self.read_here += bool(wanted)
            x, y = self.dataset.read(indices)
        else:
            x, y = pair
        # Stored rows cross (pinned: without blocking), then the transform runs on the device.
        if self.pin_memory:
            x, y = to_device(x, self.device), to_device(y, self.device)
        else:
            x, y = x.to(self.device), y.to(self.device)
        if self.dataset.transform is not None:
            x = self.dataset.transform(x, indices, epoch)
        return x, y

    def _next(self, wanted: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._batches is None:
            return None
        try:
            x, y = next(self._batches)
        except StopIteration:
            self._batches = None
            return None
        except DatasetFormatError as err:
            raise one_line(err) from None
        if self._issued.popleft() != wanted:
            self._batches = None  # the run left the sampler's plan: read here until next epoch
            return None
        return x, y
