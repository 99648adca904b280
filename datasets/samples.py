"""The vocabulary of samples on disk: where one sample lives, how a dataset's samples are read,
and the deterministic split rule. Shared by discovery, decoding and the steel layout."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectforge.datasets.contract import SPLITS
from defectforge.datasets.images import DEFAULT_MAX_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives. ``folder_class`` is set when the class comes from the folder name."""

    id: str
    image_path: str
    mask_path: str | None
    split: str
    folder_class: str | None = None


@dataclass(frozen=True)
class SampleSpec:
    """How every sample of one dataset is decoded and checked."""

    dataset: str
    classes: tuple[str, ...]
    channels: int
    binary: bool = False
    mask_threshold: int | None = None
    folder_classes: dict[str, str] = field(default_factory=dict)
    missing_mask_is_background: bool = False  # an image without a mask is all background
    steel: Any = None  # SteelOptions: samples are photometric-stereo folders under ``root``
    root: str = ""
    # Refuses, never changes content: left out of the repr that identifies a dataset.
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, repr=False, compare=False)

    @property
    def output_classes(self) -> tuple[str, ...]:
        return ("background", "defect") if self.binary else self.classes


def hash_split(sample_id: str, ratios: tuple[float, float, float]) -> str:
    """Deterministic split from the sample id alone, so re-running a build never reshuffles."""
    position = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) / 2**32
    edge = 0.0
    for split, ratio in zip(SPLITS, ratios, strict=True):
        edge += ratio
        if position < edge:
            return split
    return SPLITS[-1]


def carve_test_split(sample_id: str, split: str, test_fraction: float) -> str:
    """Move a hash-chosen ``test_fraction`` of train into test (for sources that ship no test)."""
    if split != "train" or test_fraction <= 0:
        return split
    return (
        "test"
        if hash_split(sample_id, (1 - test_fraction, 0.0, test_fraction)) == "test"
        else split
    )


def is_mask_file(path: Path, mask_suffix: str) -> bool:
    """Whether ``path`` is a mask lying beside its image rather than an image: named with the
    mask suffix, or, without one, a PNG beside a same-stem image of another format."""
    if mask_suffix:
        return path.stem.endswith(mask_suffix)
    return path.suffix.lower() == ".png" and any(
        path.with_suffix(s).is_file() for s in IMAGE_SUFFIXES if s != ".png"
    )
