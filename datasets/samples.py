"""The vocabulary of samples on disk: where one sample lives, how a dataset's samples are read,
and the deterministic split rule. Shared by discovery, decoding and the steel layout."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectforge.core.errors import DataError
from defectforge.datasets.contract import SPLITS
from defectforge.datasets.images import DEFAULT_MAX_PIXELS

# Portable anymap (PGM/PPM/PNM) is what many machine-vision cameras and libraries save.
IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    ".pnm",
)
# Folders that operating systems, NAS boxes and archivers add beside a user's images (their
# thumbnails and resource forks are image-named files, never samples); names starting with a dot
# are hidden likewise.
SYSTEM_FOLDERS = frozenset(
    {"__macosx", "@eadir", "#recycle", "#snapshot", "$recycle.bin", "system volume information"}
)
# Split folder names as people write them, to the split they name.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives. ``folder_class`` is set when the class comes from the folder name."""

    id: str
    image_path: str
    mask_path: str | None
    split: str
    folder_class: str | None = None
    split_group: str | None = None  # its --group-by group: images that share one split


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
    input_bits: int = field(default=8, repr=False)  # see identity()

    def identity(self) -> str:
        """How samples are decoded, as the dataset id reads it: 8-bit sets keep the identity
        they had before other bit depths were read."""
        bits = "" if self.input_bits == 8 else f" input_bits={self.input_bits}"
        return repr(self) + bits

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


def visible(name: str) -> bool:
    """Whether a file or folder name is the user's: hidden and system ones are not."""
    return not name.startswith(".") and name.lower() not in SYSTEM_FOLDERS


def split_named(folder: str) -> str | None:
    """The split a folder's name gives (``Train``, ``validation``), or None."""
    return SPLIT_NAMES.get(folder.lower())


def image_files(root: Path) -> list[Path]:
    """Every visible image file under ``root``, sorted, following linked folders (each real
    folder once, so a link to a folder above cannot loop). A link to a missing file is listed:
    reading it says so."""
    found = []
    seen = set()
    for folder, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if visible(name)]
        found.extend(
            Path(folder) / name
            for name in files
            if visible(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found)


def masks_among(paths: list[Path], mask_suffix: str) -> set[Path]:
    """Which of ``paths`` are masks lying beside their images rather than images: named with
    the mask suffix, or, without one, a PNG beside a same-stem image of another format. Any case
    of an extension counts (``t00.PNG`` beside ``t00.JPG``)."""
    if mask_suffix:
        return {p for p in paths if p.stem.endswith(mask_suffix)}
    not_png = {(p.parent, p.stem) for p in paths if p.suffix.lower() != ".png"}
    return {p for p in paths if p.suffix.lower() == ".png" and (p.parent, p.stem) in not_png}


def require_folder(folder: Path, option: str) -> None:
    if folder.is_file():
        raise DataError(
            folder, "is a file, not a folder", f"point {option} at the folder holding it"
        )
    if not folder.is_dir():
        raise DataError(folder, "folder does not exist", f"check the {option} path")


def refuse_same_names(named: list[tuple[str, Path]]) -> None:
    """Two images under one name (``a.jpg`` and ``a.bmp``) would share an id, a mask and output
    files: refused, naming both."""
    seen: dict[str, Path] = {}
    for name, path in named:
        if name in seen:
            raise DataError(
                path,
                f"has the same name as {seen[name]} (both are {name!r} without their extension)",
                "rename or remove one of them: outputs and masks are matched by that name",
            )
        seen[name] = path
