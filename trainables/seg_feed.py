"""The segmentation feed: train and val batches for one run's loop, from a Ray Data pass per
epoch or, for a split that fits in memory, replayed from its first pass; the checks that a
crop and a batch fit the data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray.data
import ray.train
import torch

from defectforge.core.errors import ConfigError
from defectforge.datasets.batches import BatchMaker
from defectforge.datasets.replay import (
    CachedRows,
    encoded_bytes,
    prefetched,
    within_cache_limit,
)
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.loop import LoopIO
from defectforge.trainables.data_jobs import largest_side, read_split, train_rows

SHUFFLE_BUFFER = 256


def _torch_collate(maker: BatchMaker):
    def collate(batch):
        return {key: torch.from_numpy(value) for key, value in maker(batch).items()}

    return collate


def seg_loop_io(
    cfg: SegConfig,
    train_data,
    val_data,
    train_count: int,
    report,
    *,
    in_memory: bool = False,
    world: int = 1,
    rank: int = 0,
    resume_from: Path | None = None,
    device: torch.device | None = None,
    prepare=lambda model: model,
) -> LoopIO:
    """The loop's batches and callbacks over ``train_data``/``val_data`` (a Ray Dataset, or a
    Ray Train worker's shard of one: both iterate the same way). With ``in_memory``
    (``fits_in_memory``) both are read once, before the first step, and every epoch replays
    them from memory; otherwise every epoch is a new Ray Data pass."""
    train_maker = BatchMaker(cfg.batch_spec(), train=True, seed=cfg.seed * 1000 + rank)
    val_maker = BatchMaker(cfg.batch_spec(), train=False)
    steps = train_count // (world * cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    feed = partial(_replayed_from_memory, rank=rank) if in_memory else _ray_data_passes
    return LoopIO(
        train_batches=feed(train_data, cfg, train_maker, train=True),
        val_batches=partial(feed(val_data, cfg, val_maker, train=False), 0),
        steps_per_epoch=max(steps, 1),
        report=report,
        resume_from=resume_from,
        device=device or torch.device("cpu"),
        prepare_model=prepare,
        rank=rank,
        on_epoch_start=train_maker.set_epoch,
    )


def _ray_data_passes(data, cfg: SegConfig, maker: BatchMaker, train: bool):
    """Epoch -> a Ray Data pass over ``data``; for training, locally shuffled, whole batches."""

    def epoch_batches(epoch: int):
        options = {"batch_size": cfg.batch_size, "collate_fn": _torch_collate(maker)}
        if train:
            options.update(
                drop_last=True,
                local_shuffle_buffer_size=SHUFFLE_BUFFER,
                local_shuffle_seed=cfg.seed + epoch,
            )
        return data.iter_torch_batches(prefetch_batches=2, **options)

    return epoch_batches


def _replayed_from_memory(data, cfg: SegConfig, maker: BatchMaker, train: bool, rank: int):
    """Epoch -> a pass over ``data``'s rows, read once on the first call and kept in memory;
    for training, reshuffled per epoch and rank, whole batches. Batches are prepared two ahead
    in a thread."""
    cached: CachedRows | None = None

    def epoch_batches(epoch: int):
        nonlocal cached
        if cached is None:
            cached = CachedRows(data.iter_batches(batch_size=256, batch_format="numpy"))
        seed = (cfg.seed, rank, epoch) if train else None
        rows = cached.batches(cfg.batch_size, seed, drop_last=train)
        return prefetched(_torch_collate(maker)(batch) for batch in rows)

    return epoch_batches


@dataclass(frozen=True)
class Splits:
    """What a run trains and validates on: its train rows (real plus the chosen synthetic ones,
    defect rows oversampled) and the val split as Ray Datasets, the train row count, and
    whether a worker keeps both in memory (``fits_in_memory``)."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    train_count: int
    in_memory: bool


def read_splits(cfg: SegConfig) -> Splits:
    """The config's splits; a damaged or missing dataset, and crops or batches the data cannot
    fill, fail here in one line, before a run folder is made."""
    train = train_rows(cfg.data, cfg.synthetic, cfg.mix, cfg.defect_oversample)
    val = read_split(cfg.data, "val")
    check_crop_fits(cfg)
    count = train.count()
    check_batch_fits(cfg, count)
    return Splits(train, val, count, fits_in_memory(cfg))


def crop_limit(cfg: SegConfig) -> tuple[int, int]:
    """(the longest train image side, or the resize; the largest crop that fits it)."""
    side = cfg.image_size or max(
        largest_side(root, "train") for root in (cfg.data, cfg.synthetic) if root
    )
    return side, -(-side // 32) * 32  # crops come in multiples of 32


def check_crop_fits(cfg: SegConfig) -> None:
    """Refuse a crop larger than every train image: each would be mostly padding, and a huge
    one exhausts memory only once training has started."""
    if not cfg.crop_size:
        return
    side, limit = crop_limit(cfg)
    if cfg.crop_size > limit:
        seen = "the images are resized to" if cfg.image_size else "the longest train image side is"
        raise ConfigError(
            f"crop_size = {cfg.crop_size}: larger than every train image ({seen} {side} px), so "
            f"each crop would be mostly padding; set crop_size (--crop-size) to {limit} or less, "
            "or to 0 for whole images"
        )


def check_batch_fits(cfg: SegConfig, train_count: int) -> None:
    """Refuse a batch no worker can fill: whole batches only are trained on, so such a run
    would take no step and publish its untrained weights."""
    per_worker = train_count // cfg.workers
    if per_worker >= cfg.batch_size:
        return
    workers = f", {per_worker} for each of {cfg.workers} workers" if cfg.workers > 1 else ""
    fix = (
        f"set batch_size (--batch-size) to {per_worker} or less"
        if per_worker
        else f"train with at most {train_count} workers, or add train images"
    )
    raise ConfigError(
        f"batch_size = {cfg.batch_size}: the train split gives {train_count} images per "
        f"epoch{workers}, fewer than one batch, so not one training step would run; {fix}"
    )


def one_worker_io(
    cfg: SegConfig, splits: Splits, report, resume_from: Path | None = None
) -> LoopIO:
    """The loop's IO for one worker training in this process: a one-worker ``seg train``'s
    task, a study trial."""
    return seg_loop_io(
        cfg,
        splits.train,
        splits.val,
        splits.train_count,
        report,
        in_memory=splits.in_memory,
        resume_from=resume_from,
        device=torch.device("cuda" if cfg.use_gpu else "cpu"),
    )


def fits_in_memory(cfg: SegConfig) -> bool:
    """Whether a worker keeps its train and val rows in memory (``seg_loop_io``'s in_memory):
    their encoded images and masks, counted from Parquet metadata (every synthetic row and every
    oversampled copy as if all were chosen), are within ``replay.CACHED_SPLIT_BYTES``. A run
    decides once, on its driver (``read_splits``), so that every rank of a Train run does the
    same."""
    cells = ("image", "mask")
    train = encoded_bytes(cfg.data, "train", cells)
    if cfg.synthetic and cfg.synthetic_ratio:
        train += encoded_bytes(cfg.synthetic, "train", cells)
    total = train * cfg.defect_oversample + encoded_bytes(cfg.data, "val", cells)
    return within_cache_limit(total)
