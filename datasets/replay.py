"""A split's encoded rows kept in memory and replayed, reshuffled, every epoch.

A Ray Data pass per epoch costs a start-up and read tasks that share the cores with training;
for splits that fit in memory the trainers read their rows once and replay them from here (the
GAN from its first pass, segmentation before its first step). Decoding and augmentation still
happen per batch, so every epoch sees new crops and augmentations.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from defectforge.datasets.contract import parquet_metadata, split_files

# Encoded rows (PNG bytes) up to which a worker keeps its rows in memory instead of streaming.
CACHED_SPLIT_BYTES = 1 << 30


def within_cache_limit(size: int) -> bool:
    """Whether rows of ``size`` encoded bytes are kept in memory rather than streamed."""
    return size <= CACHED_SPLIT_BYTES


def encoded_bytes(root: str | Path, split: str, columns: Iterable[str]) -> int:
    """The uncompressed size of ``columns`` of a split, from its Parquet metadata (no read)."""
    total = 0
    for file in split_files(root, split):
        metadata = parquet_metadata(file)
        indices = [metadata.schema.names.index(name) for name in columns]
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            total += sum(row_group.column(index).total_uncompressed_size for index in indices)
    return total


class CachedRows:
    """Rows as numpy columns (object arrays of encoded cells), batched in a seeded order.

    Only ``columns`` are kept, sorted by ``order_by``: Ray Data does not keep row order from run
    to run, and a seeded shuffle of a list that arrives in another order would give a resumed
    run other batches than an uninterrupted one.
    """

    def __init__(
        self,
        batches: Iterable[dict[str, np.ndarray]],
        columns: tuple[str, ...] = ("id", "image", "mask"),
        order_by: str = "id",
    ):
        batches = list(batches)
        self.columns = {
            key: np.concatenate([batch[key] for batch in batches]) if batches else np.array([])
            for key in columns
        }
        order = np.argsort(self.columns[order_by], kind="stable")
        self.columns = {key: values[order] for key, values in self.columns.items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def batches(
        self, batch_size: int, shuffle_seed=None, drop_last: bool = True
    ) -> Iterator[dict[str, np.ndarray]]:
        """One epoch: every row once, in the order ``shuffle_seed`` draws (None: stored order)."""
        count = len(self)
        order = (
            np.arange(count)
            if shuffle_seed is None
            else np.random.default_rng(shuffle_seed).permutation(count)
        )
        last = count - batch_size + 1 if drop_last else count
        for start in range(0, max(last, 0), batch_size):
            picked = order[start : start + batch_size]
            yield {key: values[picked] for key, values in self.columns.items()}


_END = object()


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """``items``, made ``depth`` ahead in a background thread (batch preparation overlaps the
    training step: decoding and OpenCV release the GIL). An error there is raised here; leaving
    the loop early stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(ready, item, stop):
                    return
            _put(ready, _END, stop)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            _put(ready, error, stop)

    thread = threading.Thread(target=produce, name="defectforge-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone; False when it has."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
