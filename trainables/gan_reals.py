"""What a GAN run is measured against: real images cut as the GAN sees them, real defect crops,
and the presence classifier (``gan.presence``) learnt from the real train crops.

Read on the driver from the dataset's Parquet files and shipped to the workers; the same
measures score a finished generator in ``gan metrics``, so a snapshot's figures and a later
score of the same generator agree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from defectforge.core.errors import DataError
from defectforge.core.storage import Location
from defectforge.datasets.batches import GanBatchMaker
from defectforge.datasets.contract import read_parquet, split_files
from defectforge.datasets.manifest import Manifest
from defectforge.gan.config import GanConfig
from defectforge.gan.metrics import sliced_wasserstein
from defectforge.gan.presence import Presence, presence_targets, shares_of, train_presence

PRESENCE_FILE = "presence.pt"
# A crop holds a defect class when at least this many of its pixels are that class: a 4 x 4
# spot, small against a 64-px crop but more than a stray pixel of a mask's edge.
MIN_DEFECT_PIXELS = 16
# Real crops the presence classifier learns from per metric image (several per image on a small
# train split), and at most.
PRESENCE_CROPS_PER_METRIC_IMAGE, PRESENCE_CROPS = 16, 4000


def wanted(cfg: GanConfig):
    """The rows the GAN learns from, as a predicate both Ray Data and pyarrow evaluate natively
    (None: every row)."""
    from ray.data.expressions import col

    if cfg.defect_class:
        return col("defect_class") == cfg.defect_class
    return col("defect_class").is_not_null() if cfg.conditional else None


def columns(cfg: GanConfig) -> list[str]:
    """What the GAN reads of a row: masks (and the image's file, for errors) only where it
    draws them or they place its crops."""
    reads_masks = cfg.masks or cfg.defect_crops
    return ["id", "image", "defect_class", *(["mask", "origin"] if reads_masks else [])]


def train_rows(cfg: GanConfig, split: str = "train", with_masks: bool = False) -> pa.Table:
    """The rows the GAN learns from, read on the driver."""
    names = columns(cfg)
    if with_masks:
        names = [*dict.fromkeys([*names, "mask", "origin"])]
    table = read_parquet(split_files(cfg.data, split), columns=names)
    predicate = wanted(cfg)
    table = table if predicate is None else table.filter(predicate.to_pyarrow())
    if not table.num_rows:
        raise DataError(
            cfg.data,
            f"no {split} images match the requested class",
            "check --class against the dataset's classes",
        )
    return table


def check_enough_rows(cfg: GanConfig) -> None:
    """Every worker needs a batch of its own: said before anything starts, not minutes into
    the run when a worker's shard comes up short."""
    count = train_rows(cfg).num_rows
    per_worker = count // cfg.workers
    if per_worker < cfg.batch_size:
        which = f" of class {cfg.defect_class}" if cfg.defect_class else ""
        raise DataError(
            cfg.data,
            f"{count} train image(s){which} give each of {cfg.workers} GAN worker(s) "
            f"{per_worker}, fewer than one batch of {cfg.batch_size}",
            f"lower --batch-size to {max(2, per_worker - per_worker % 2)} or less, use fewer "
            "--workers, or add images",
        )


def check_defects_to_learn(cfg: GanConfig) -> None:
    """A generator that draws masks (or centres crops on defects) learns from defect pixels: on
    train images without any it would publish noise as "exact masks"."""
    if not (cfg.masks or cfg.defect_crops):
        return
    # The class column alone: the images and masks are read once, by the run.
    classes = read_parquet(split_files(cfg.data, "train"), columns=["defect_class"])
    if not pc.sum(pc.is_valid(classes["defect_class"])).as_py():
        flag = "--masks" if cfg.masks else "--defect-crops"
        raise DataError(
            cfg.data,
            f"none of its {classes.num_rows} train images has a defect pixel in its mask, and "
            f"{flag} learns from them",
            "give a dataset whose masks mark defects (`data build`: check --mask-threshold), "
            f"or leave out {flag}",
        )


def crop_seed(cfg: GanConfig, rank: int) -> int | None:
    """Each worker's crops differ; the metric reals (rank -1) are the same crops every time."""
    return cfg.seed * 1000 + rank + 1 if cfg.native_crops else None


def batch_maker(cfg: GanConfig, rank: int, defect_crops: float | None = None) -> GanBatchMaker:
    classes = cfg.classes if cfg.conditional else ()
    return GanBatchMaker(
        cfg.channels,
        cfg.resolution,
        classes,
        crop_seed(cfg, rank),
        cfg.defect_crops if defect_crops is None else defect_crops,
        mask_classes=cfg.mask_channels,
        mirror=cfg.mirror,
        mirror_seed=cfg.seed * 1000 + rank + 1,
    )


def _shuffled(table: pa.Table, seed: int, count: int) -> list[dict]:
    rows = table.to_pylist()
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:count]]


def metric_reals(cfg: GanConfig, split: str = "train") -> np.ndarray:
    """The first ``metric_images`` real images (seeded shuffle) at the GAN resolution, uint8,
    cropped as the GAN sees them."""
    picked = _shuffled(train_rows(cfg, split), cfg.seed, cfg.metric_images)
    masks = [row["mask"] for row in picked] if cfg.defect_crops else None
    origins = [row["origin"] for row in picked] if cfg.defect_crops else None
    return batch_maker(cfg, rank=-1).images([row["image"] for row in picked], masks, origins)


def _real_views(cfg: GanConfig, defect_crops: float, count: int, seed: int):
    """Up to ``count`` real (image, mask) views, several per image on a small split, and the
    index of the image each came from."""
    rows = train_rows(cfg, with_masks=True).to_pylist()
    copies = max(1, count // len(rows)) if cfg.native_crops else 1
    order = np.random.default_rng(seed).permutation(len(rows))[:count]
    picked = [rows[i] for i in order] * copies
    groups = np.tile(order, copies)
    maker = GanBatchMaker(
        cfg.channels,
        cfg.resolution,
        crop_seed=seed if cfg.native_crops else None,
        defect_crops=defect_crops if cfg.native_crops else 0.0,
    )
    images, masks = maker.pairs(
        [row["image"] for row in picked],
        [row["mask"] for row in picked],
        [row["origin"] for row in picked],
    )
    return images, masks, groups


def defect_reals(cfg: GanConfig) -> np.ndarray:
    """Real crops centred on a defect (whole images holding one, without native crops), as many
    as the metric uses: what SWD to defects compares samples with."""
    images, masks, _ = _real_views(cfg, 1.0, cfg.metric_images, cfg.seed + 1)
    held = presence_targets(masks, len(cfg.classes), MIN_DEFECT_PIXELS).any(axis=1)
    return images[held][: cfg.metric_images]


def measures_for(cfg: GanConfig, run: Location | None = None) -> SampleMeasures | None:
    """The measures of a run on a dataset with masks (None without): its presence classifier
    is learnt once and kept as ``RUN/presence.pt``, so a resumed run scores alike."""
    if not Manifest.load(cfg.data).masks:
        return None
    saved = run / PRESENCE_FILE if run is not None else None
    if saved is not None and saved.is_file():
        state = torch.load(io.BytesIO(saved.read_bytes()), weights_only=False)
        presence = Presence.from_state(state)
    else:
        count = min(PRESENCE_CROPS, PRESENCE_CROPS_PER_METRIC_IMAGE * cfg.metric_images)
        images, masks, groups = _real_views(cfg, 0.5, count, cfg.seed + 2)
        presence = train_presence(
            images, masks, groups, cfg.classes, MIN_DEFECT_PIXELS, seed=cfg.seed
        )
        if saved is not None:
            buffer = io.BytesIO()
            torch.save(presence.state(), buffer)
            saved.write_bytes(buffer.getvalue())
    return SampleMeasures(defect_reals(cfg), presence.state(), cfg.classes)


@dataclass
class SampleMeasures:
    """Scores a snapshot's samples: SWD to real defect crops, the share holding each defect
    class (presence classifier), and for a generator that draws masks, the share whose drawn
    mask holds one and how often the classifier agrees with the drawn mask."""

    defect_reals: np.ndarray
    presence_state: dict
    classes: tuple[str, ...]

    def __call__(self, images: np.ndarray, masks: np.ndarray | None) -> dict:
        presence = Presence.from_state(self.presence_state)
        metrics = {"presence_accuracy": presence.held_out_accuracy}
        if len(self.defect_reals):
            metrics["swd_defect"] = sliced_wasserstein(self.defect_reals, images)["swd"]
        held = presence.held(images)
        metrics.update(shares_of(held, presence.classes))
        metrics["real_defect_share"] = presence.real_shares["defect_share"]
        if masks is not None:
            drawn = presence_targets(masks, len(self.classes), MIN_DEFECT_PIXELS).astype(bool)
            metrics["drawn_share"] = float(drawn.any(axis=1).mean())
            metrics["drawn_agreement"] = float((drawn == held).all(axis=1).mean())
        return metrics
