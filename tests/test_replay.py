"""Rows read once and replayed from memory: the order, the prefetching thread, and the seg feed."""

import threading
import time

import numpy as np
import pytest

from defectforge.datasets.contract import encode_png
from defectforge.datasets.replay import CachedRows, prefetched


def _rows(values, chunk: int = 3) -> list[dict[str, np.ndarray]]:
    """Batches of rows as they may arrive from Ray Data, with ids that sort like the values."""
    values = np.asarray(values)
    ids = np.array([f"s{value:03d}" for value in values], dtype=object)
    return [
        {"id": ids[start : start + chunk], "value": values[start : start + chunk]}
        for start in range(0, len(values), chunk)
    ]


def _cached(values, chunk: int = 3) -> CachedRows:
    return CachedRows(_rows(values, chunk), columns=("id", "value"))


def test_an_epoch_holds_every_row_once_in_an_order_its_seed_fixes():
    cached = _cached(range(10))

    def epoch(seed, drop_last=True):
        return [list(b["value"]) for b in cached.batches(4, seed, drop_last=drop_last)]

    assert len(cached) == 10
    assert epoch(None, drop_last=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert epoch(None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    whole = sum(epoch((7, 0, 1), drop_last=False), [])
    assert sorted(whole) == list(range(10)) and whole != list(range(10))
    assert epoch((7, 0, 1)) == epoch((7, 0, 1))
    assert epoch((7, 0, 1)) != epoch((7, 0, 2))


def test_the_order_rows_arrive_in_changes_no_epoch():
    arrived = _cached(range(10), chunk=3)
    reordered = _cached([7, 2, 9, 0, 5, 1, 8, 3, 6, 4], chunk=4)

    for seed in ((0, 0, 1), (0, 1, 1), (5, 0, 3)):
        first = [list(b["value"]) for b in arrived.batches(4, seed)]
        assert first == [list(b["value"]) for b in reordered.batches(4, seed)]


def test_no_rows_give_no_batches():
    empty = CachedRows([], columns=("id", "value"))
    assert len(empty) == 0
    assert list(empty.batches(4, 0)) == []


def test_prefetched_yields_in_order_and_raises_the_producers_error_here():
    assert list(prefetched(iter(range(20)))) == list(range(20))

    def failing():
        yield 1
        raise ValueError("corrupt PNG in row 2")

    items = prefetched(failing())
    assert next(items) == 1
    with pytest.raises(ValueError, match="row 2"):
        next(items)


def test_leaving_the_loop_early_stops_the_prefetching_thread():
    made = []

    def endless():
        while True:
            made.append(1)
            yield len(made)

    for item in prefetched(endless(), depth=2):
        if item == 3:
            break
    time.sleep(0.3)
    assert "defectforge-prefetch" not in [thread.name for thread in threading.enumerate()]
    assert len(made) <= 3 + 2 + 1  # at most the queue's depth and one more were made ahead


# --- the segmentation feed over a Ray dataset -----------------------------------------------


class CountedDataset:
    """A Ray dataset that counts the passes started over it."""

    def __init__(self, dataset):
        self.dataset, self.passes = dataset, 0

    def iter_batches(self, **options):
        self.passes += 1
        return self.dataset.iter_batches(**options)

    def iter_torch_batches(self, **options):
        self.passes += 1
        return self.dataset.iter_torch_batches(**options)


def _flat_images(rows: int) -> CountedDataset:
    import ray.data

    mask = encode_png(np.zeros((32, 32), np.uint8))
    items = [
        {
            "id": f"s{row:03d}",
            "image": encode_png(np.full((32, 32), 5 * row, np.uint8)),
            "mask": mask,
        }
        for row in range(rows)
    ]
    return CountedDataset(ray.data.from_items(items))


def _seg_io(train, val, in_memory: bool):
    from defectforge.segmentation.config import SegConfig
    from defectforge.trainables.seg_feed import seg_loop_io

    cfg = SegConfig(
        data="unused",
        classes=("background", "defect"),
        channels=1,
        mean=(0.0,),
        std=(1.0,),
        arch="unet",
        encoder="resnet18",
        batch_size=4,
        aug_strength=0.0,
        crop_size=0,
    )
    return seg_loop_io(cfg, train, val, 10, lambda *_: None, in_memory=in_memory)


def _values(batches) -> list[int]:
    return [round(float(b["image"][i, 0, 0, 0]) * 255 / 5) for b in batches for i in range(4)]


def test_seg_replay_reads_each_split_once_and_reshuffles_every_epoch(ray_session):
    train, val = _flat_images(10), _flat_images(6)
    io = _seg_io(train, val, in_memory=True)

    epochs = [_values(io.train_batches(epoch)) for epoch in range(3)]
    validated = [sum(len(b["image"]) for b in io.val_batches()) for _ in range(2)]

    assert train.passes == 1 and val.passes == 1
    assert all(len(set(epoch)) == 8 and set(epoch) <= set(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert validated == [6, 6]  # validation keeps its last, smaller batch


def test_seg_streaming_starts_a_pass_every_epoch(ray_session):
    train, val = _flat_images(8), _flat_images(4)
    io = _seg_io(train, val, in_memory=False)

    for epoch in range(2):
        assert len(_values(io.train_batches(epoch))) == 8
        list(io.val_batches())

    assert train.passes == 2 and val.passes == 2


def test_the_driver_decides_seg_replay_from_the_splits_size(sample_dataset, monkeypatch):
    from defectforge.datasets import replay
    from defectforge.trainables.seg import config_from_manifest
    from defectforge.trainables.seg_feed import fits_in_memory

    cfg = config_from_manifest(sample_dataset, arch="unet")
    assert fits_in_memory(cfg)  # the bundled sample: a few hundred kB
    monkeypatch.setattr(replay, "CACHED_SPLIT_BYTES", 1000)
    assert not fits_in_memory(cfg)
