"""Find samples on disk: the NEU-Seg layout and any folder of images with masks.

Discovery only lists paths, so it is fast; decoding and checking happen per sample in
``readers.load_sample``, which the Parquet build runs in parallel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from defectforge.core.errors import DataError
from defectforge.datasets.contract import SPLITS
from defectforge.datasets.samples import (
    IMAGE_SUFFIXES,
    SampleRef,
    carve_test_split,
    hash_split,
    masks_among,
    refuse_same_names,
    require_folder,
)

NEU_SEG_CLASSES = ("background", "inclusion", "patches", "scratches")
CLASS_FILES = ("classes.yaml", "classes.yml", "classes.json")
# A mask's formats, in the order one is looked for: lossless first; JPEG masks are read like
# soft masks (--mask-threshold).
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _require_images(root: Path, found: list) -> None:
    if not found:
        raise DataError(
            root,
            f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})",
            "point --root at the folder that holds the images",
        )


def discover_neu_seg(root: str | Path, test_fraction: float = 0.0) -> list[SampleRef]:
    """NEU-Seg layout: ``images/<split>/<stem>.jpg`` with ``masks/<split>/<stem>.png``."""
    root = Path(root)
    if not (root / "images").is_dir():
        raise DataError(
            root,
            "no images/ folder (NEU-Seg layout is images/<split>, masks/<split>)",
            "point --root at the NEU-Seg folder or use --source folder",
        )
    find_mask = MaskFinder("")
    refs = []
    for split_folder in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        if split_folder.name not in SPLITS:
            raise DataError(
                split_folder,
                f"unknown split folder {split_folder.name!r}",
                f"rename it to one of {', '.join(SPLITS)}",
            )
        for image in _images_in(split_folder):
            sample_id = f"neu-seg/{split_folder.name}/{image.stem}"
            mask = find_mask(root / "masks" / split_folder.name, image.stem)
            refs.append(
                SampleRef(
                    sample_id,
                    str(image),
                    str(mask) if mask else None,
                    carve_test_split(sample_id, split_folder.name, test_fraction),
                )
            )
    _require_images(root, refs)
    refuse_same_names([(ref.id, Path(ref.image_path)) for ref in refs])
    return refs


class MaskFinder:
    """Finds an image's mask by name, whatever the case of its extension (``_mask.PNG``),
    listing each folder once."""

    def __init__(self, mask_suffix: str):
        self.mask_suffix = mask_suffix
        self._listings: dict[Path, dict[str, Path]] = {}

    def __call__(self, folder: Path, stem: str, exclude: Path | None = None) -> Path | None:
        if folder not in self._listings:
            files = folder.iterdir() if folder.is_dir() else ()
            self._listings[folder] = {p.name.lower(): p for p in files}
        listing = self._listings[folder]
        for suffix in MASK_SUFFIXES:
            candidate = listing.get(f"{stem}{self.mask_suffix}{suffix}".lower())
            if candidate is not None and candidate != exclude and candidate.is_file():
                return candidate
        return None


def group_key(relative: Path, group_by: str) -> str | None:
    """What keeps samples together in one split: ``parent`` (the image's folder), a regular
    expression (its first group, else its whole match, on the path under the root), or nothing."""
    if not group_by:
        return None
    text = relative.with_suffix("").as_posix()
    if group_by == "parent":
        return relative.parent.as_posix()
    match = re.search(group_by, text)
    if match is None:
        return text  # not matched: a group of its own
    return match.group(1) if match.groups() else match.group(0)


def discover_folder(
    root: str | Path,
    dataset: str,
    split_ratios: tuple[float, float, float],
    mask_suffix: str = "",
    class_from_folder: bool = False,
    group_by: str = "",
) -> list[SampleRef]:
    """Generic layout: ``images/`` + ``masks/`` trees, or masks beside their images.

    A first path component named train/val/test sets the split; otherwise a hash of the id does,
    or of its group (``group_by``), so near-duplicates (one part, one coil) share a split.
    """
    root = Path(root)
    require_folder(root, "--root")
    paired = (root / "images").is_dir() and (root / "masks").is_dir()
    image_root = root / "images" if paired else root
    found = _images_in(image_root)
    masks = set() if paired else masks_among(found, mask_suffix)
    images = [p for p in found if p not in masks]
    _require_images(root, images)
    find_mask = MaskFinder(mask_suffix)
    refs = []
    for image in images:
        relative = image.relative_to(image_root)
        sample_id = f"{dataset}/{relative.with_suffix('').as_posix()}"
        if paired:
            mask = find_mask((root / "masks" / relative).parent, image.stem)
        else:
            mask = find_mask(image.parent, image.stem, exclude=image)
        first = relative.parts[0] if len(relative.parts) > 1 else ""
        group = group_key(relative, group_by)
        hashed = f"{dataset}/group/{group}" if group is not None else sample_id
        split = first if first in SPLITS else hash_split(hashed, split_ratios)
        # A folder the user named a split keeps its images, whatever group they are in.
        group = None if first in SPLITS else group
        folder_class = _top_folder(relative) if class_from_folder else None
        refs.append(
            SampleRef(
                sample_id, str(image), str(mask) if mask else None, split, folder_class, group
            )
        )
    refuse_same_names([(ref.id, Path(ref.image_path)) for ref in refs])
    return refs


def _top_folder(relative: Path) -> str | None:
    """The first folder under the root that is not a split folder: the class's folder."""
    folders = [part for part in relative.parts[:-1] if part not in SPLITS]
    return folders[0] if folders else None


def read_class_file(root: str | Path) -> tuple[tuple[str, ...] | None, dict[str, str]]:
    """Class names (index = mask value) and folder-to-class names from a classes file, if any.

    Format (YAML or JSON): ``classes: [background, crack, ...]`` and optionally
    ``folders: {MT_Crack: crack, MT_Free: background}``.
    """
    for name in CLASS_FILES:
        path = Path(root) / name
        if path.is_file():
            content = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
            if not isinstance(content, dict) or not isinstance(content.get("classes"), list):
                raise DataError(
                    path,
                    "expected a mapping with a 'classes' list",
                    "write e.g. `classes: [background, scratch]`",
                )
            return tuple(str(c) for c in content["classes"]), dict(content.get("folders") or {})
    return None, {}
