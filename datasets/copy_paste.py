"""The control arm: synthetic images with exact masks and no GAN.

Defect regions (connected components of one class) are cut with their masks from the real train
images and pasted, flipped, rotated by a multiple of 90 degrees and scaled, into other train
images, their edges blended over ``feather`` pixels on either side (weight 1/2 on the edge).
The mask is the pasted region exactly; the blend only touches pixels within ``feather`` of its
edge, so every pixel deeper inside is the source's own. If GAN images do not beat these, the GAN adds nothing a cheap cut-and-paste does not.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.core.errors import DataError
from defectforge.core.storage import Location, absolute_location
from defectforge.datasets.contract import (
    MANIFEST,
    SCHEMA,
    contract_row,
    decode_png,
    read_split_table,
)
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import dominant_class
from defectforge.datasets.writer import derived_from, write_dataset

COPY_PASTE = "copy-paste"


@dataclass(frozen=True)
class CopyPasteConfig(TypedConfig):
    kind = "copy-paste config"

    count: int = option(MISSING, "synthetic images to make", lambda v: v >= 1, ">= 1")
    pastes: int = option(
        2, "defect regions pasted into each image (1 to this many)", lambda v: v >= 1, ">= 1"
    )
    min_area: int = option(
        16, "smallest defect region worth pasting, in px", lambda v: v >= 1, ">= 1"
    )
    scale: float = option(
        0.25,
        "regions are scaled by a random factor in [1 - s, 1 + s]",
        lambda v: 0 <= v < 1,
        "in [0, 1)",
    )
    feather: int = option(2, "edge blend width in px (0: hard edges)", lambda v: v >= 0, ">= 0")
    seed: int = option(0, "seed of every random choice", *SEED)


@dataclass(frozen=True)
class Region:
    """One defect region: the image pixels of its bounding box, where the region is, its class."""

    source_id: str
    pixels: np.ndarray  # h x w x C
    inside: np.ndarray  # h x w bool
    value: int


def defect_regions(sample_id: str, image: np.ndarray, mask: np.ndarray, min_area: int):
    """Every connected region of one class with at least ``min_area`` pixels."""
    for value in np.unique(mask):
        if value == 0:
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats((mask == value).astype(np.uint8))
        for index in range(1, count):
            left, top, width, height, area = stats[index]
            if area < min_area:
                continue
            box = (slice(top, top + height), slice(left, left + width))
            yield Region(sample_id, image[box], labels[box] == index, int(value))


def transformed(region: Region, rng: np.random.Generator, scale: float, limit: tuple[int, int]):
    """The region flipped, turned by k * 90 degrees and scaled, no larger than ``limit``."""
    pixels, inside = region.pixels, region.inside.astype(np.uint8)
    turns = int(rng.integers(4))
    pixels, inside = np.rot90(pixels, turns), np.rot90(inside, turns)
    if rng.random() < 0.5:
        pixels, inside = pixels[:, ::-1], inside[:, ::-1]
    factor = rng.uniform(1 - scale, 1 + scale)
    factor = min(factor, limit[0] / pixels.shape[0], limit[1] / pixels.shape[1])
    size = (max(1, round(pixels.shape[1] * factor)), max(1, round(pixels.shape[0] * factor)))
    resized = cv2.resize(np.ascontiguousarray(pixels), size, interpolation=cv2.INTER_LINEAR)
    inside = cv2.resize(np.ascontiguousarray(inside), size, interpolation=cv2.INTER_NEAREST)
    return resized.reshape(size[1], size[0], -1), inside.astype(bool)


def blend_weights(inside: np.ndarray, feather: int) -> np.ndarray:
    """1 deeper than ``feather`` px inside the region, falling to 0 across its edge."""
    if not feather:
        return inside.astype(np.float32)
    padded = np.pad(inside.astype(np.uint8), feather + 1)
    distance_in = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
    distance_out = cv2.distanceTransform(1 - padded, cv2.DIST_L2, 3)
    signed = np.where(padded > 0, distance_in - 0.5, 0.5 - distance_out)
    weights = np.clip(0.5 + signed / (2 * feather), 0, 1)
    crop = slice(feather + 1, -(feather + 1))
    return weights[crop, crop].astype(np.float32)


def paste(
    target: np.ndarray,
    target_mask: np.ndarray,
    pixels: np.ndarray,
    inside: np.ndarray,
    value: int,
    top_left: tuple[int, int],
    feather: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``target`` with the region blended in at ``top_left``; its mask with the region's class."""
    top, left = top_left
    box = (slice(top, top + inside.shape[0]), slice(left, left + inside.shape[1]))
    weights = blend_weights(inside, feather)[:, :, None]
    image, mask = target.copy(), target_mask.copy()
    mixed = weights * pixels.astype(np.float32) + (1 - weights) * image[box].astype(np.float32)
    image[box] = np.round(mixed).astype(np.uint8)
    mask[box][inside] = value
    return image, mask


def _train_samples(data: str | Path, channels: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    table = read_split_table(data, "train", columns=["id", "image", "mask"])
    if table is None:
        raise DataError(
            Location.of(data) / MANIFEST,
            "dataset has no train split",
            "build one with train images",
        )
    columns = (table[name].to_pylist() for name in ("id", "image", "mask"))
    return [
        (sample_id, decode_png(image, channels), decode_png(mask, 0))
        for sample_id, image, mask in zip(*columns, strict=True)
    ]


def _made(index: int, samples, regions: list[Region], cfg: CopyPasteConfig):
    """The ``index``-th image: a train image with 1..pastes regions of other images pasted in
    (of itself only where no other image has one)."""
    rng = np.random.default_rng([cfg.seed, index])
    target_id, image, mask = samples[int(rng.integers(len(samples)))]
    others = [region for region in regions if region.source_id != target_id] or regions
    sources = []
    for _ in range(int(rng.integers(1, cfg.pastes + 1))):
        region = others[int(rng.integers(len(others)))]
        pixels, inside = transformed(region, rng, cfg.scale, image.shape[:2])
        top = int(rng.integers(image.shape[0] - inside.shape[0] + 1))
        left = int(rng.integers(image.shape[1] - inside.shape[1] + 1))
        image, mask = paste(image, mask, pixels, inside, region.value, (top, left), cfg.feather)
        sources.append(region.source_id)
    return image, mask, f"{COPY_PASTE}: {target_id} + {', '.join(sources)}"


def _refuse_no_regions(where, samples, min_area: int):
    largest = max(
        (
            int(region.inside.sum())
            for sample_id, image, mask in samples
            for region in defect_regions(sample_id, image, mask, 1)
        ),
        default=0,
    )
    if not largest:
        raise DataError(
            where,
            f"the train split's {len(samples)} masks mark no defect pixel, so there is no defect "
            "to cut",
            "use a dataset whose train masks hold defects (data build with the masks; check "
            "its --mask-threshold)",
        )
    raise DataError(
        where,
        f"no defect region of {min_area} px or more in the train split (the largest is "
        f"{largest} px)",
        f"lower --min-area to {largest} or less",
    )


def copy_paste_dataset(
    data: str | Path, out: str | Path, cfg: CopyPasteConfig, overwrite: bool = False
) -> Manifest:
    """``cfg.count`` copy-paste images made from ``data``'s train split, as a labelled set."""
    manifest = derived_from(data, out, overwrite, "cut from")
    samples = _train_samples(data, manifest.channels)
    regions = [
        region
        for sample_id, image, mask in samples
        for region in defect_regions(sample_id, image, mask, cfg.min_area)
    ]
    if not regions:
        _refuse_no_regions(Location.of(data) / MANIFEST, samples, cfg.min_area)
    rows = []
    for index in range(cfg.count):
        image, mask, origin = _made(index, samples, regions, cfg)
        rows.append(
            contract_row(
                id=f"{COPY_PASTE}/{manifest.dataset}/{cfg.seed}-{index:05d}",
                image=image,
                mask=mask,
                dataset=manifest.dataset,
                origin=origin,
                defect_class=dominant_class(mask, manifest.classes),
                label_confidence=1.0,
            )
        )
    with write_dataset(out, overwrite, inputs=(data,)) as staging:
        staging.write_split("train", pa.Table.from_pylist(rows, schema=SCHEMA))
        details = {**asdict(cfg), "regions": len(regions)}
        train_ids = sorted(sample_id for sample_id, _, _ in samples)
        staging.publish(manifest.pasted(details, absolute_location(data), train_ids))
    return staging.manifest
