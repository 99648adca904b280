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
    image_files,
    masks_among,
    refuse_same_names,
    require_folder,
    split_named,
    visible,
)

NEU_SEG_CLASSES = ("background", "inclusion", "patches", "scratches")
CLASS_FILES = ("classes.yaml", "classes.yml", "classes.json")
# A mask's formats, in the order one is looked for: lossless first; JPEG masks are read like
# soft masks (--mask-threshold).
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".pbm", ".pnm", ".jpg", ".jpeg", ".jpe")
# Names (any case) of a folder of images beside a folder of their masks, and of that mask folder.
IMAGE_TREES = ("images", "image", "imgs", "img")
MASK_TREES = (
    "masks",
    "mask",
    "labels",
    "label",
    "annotations",
    "ground_truth",
    "groundtruth",
    "gt",
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
        for image in image_files(split_folder):
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
    class_names: frozenset[str] = frozenset(),
) -> list[SampleRef]:
    """Generic layout: masks beside their images, or in a mask tree (``masks/``, ``labels/``,
    ``ground_truth/``, ... in any case) at the path of their image under ``images/`` (or under
    the root), the split folder optionally left out as MVTec AD does.

    A first folder naming a split (``train``, ``Val``, ``validation``, ...) sets it; otherwise a
    hash of the id does, or of its group (``group_by``), so near-duplicates (one part, one coil)
    share a split. A mask that matches no image is refused: it means the layout was misread.
    """
    root = Path(root)
    require_folder(root, "--root")
    mask_tree = _subfolder_named(root, MASK_TREES)
    image_root = (_subfolder_named(root, IMAGE_TREES) if mask_tree else None) or root
    found = [p for p in image_files(image_root) if mask_tree not in p.parents]
    beside = masks_among(found, mask_suffix)
    images = [p for p in found if p not in beside]
    _require_images(root, images)
    find_mask = MaskFinder(mask_suffix)
    refs = []
    for image in images:
        relative = image.relative_to(image_root)
        sample_id = f"{dataset}/{relative.with_suffix('').as_posix()}"
        mask = _mask_in_tree(find_mask, mask_tree, relative) if mask_tree else None
        mask = mask or find_mask(image.parent, image.stem, exclude=image)
        named_split = split_named(relative.parts[0]) if len(relative.parts) > 1 else None
        group = group_key(relative, group_by)
        hashed = f"{dataset}/group/{group}" if group is not None else sample_id
        split = named_split or hash_split(hashed, split_ratios)
        # A folder the user named a split keeps its images, whatever group they are in.
        group = None if named_split else group
        folder_class = _class_folder(relative, class_names) if class_from_folder else None
        refs.append(
            SampleRef(
                sample_id, str(image), str(mask) if mask else None, split, folder_class, group
            )
        )
    refuse_same_names([(ref.id, Path(ref.image_path)) for ref in refs])
    tree_masks = set(image_files(mask_tree)) if mask_tree else set()
    _refuse_masks_not_one_per_image(tree_masks | beside, refs, image_root, mask_tree, mask_suffix)
    return refs


def _subfolder_named(root: Path, names: tuple[str, ...]) -> Path | None:
    """``root``'s folder named one of ``names`` in any case (the first of them there is)."""
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and visible(p.name)}
    return next((folders[name] for name in names if name in folders), None)


def _mask_in_tree(find_mask: MaskFinder, mask_tree: Path, relative: Path) -> Path | None:
    """The image's mask at its path under the mask tree, or at that path without its split
    folder (MVTec AD: ``test/crack/000.png`` -> ``ground_truth/crack/000_mask.png``)."""
    mask = find_mask((mask_tree / relative).parent, relative.stem)
    if mask is None and len(relative.parts) > 1 and split_named(relative.parts[0]):
        mask = find_mask((mask_tree / Path(*relative.parts[1:])).parent, relative.stem)
    return mask


def _refuse_masks_not_one_per_image(
    masks: set[Path],
    refs: list[SampleRef],
    image_root: Path,
    mask_tree: Path | None,
    mask_suffix: str,
) -> None:
    """Masks no image took would be lost without a word (a build of defect-free images, with
    --missing-mask background), and one two images took would label one of them wrongly:
    refused, naming the first."""
    taken: dict[str, str] = {}
    for ref in refs:
        if ref.mask_path in taken:
            raise DataError(
                ref.mask_path,
                f"mask is the one of two images, {taken[ref.mask_path]} and {ref.image_path}",
                "give each image its own mask (keep the split folder in the mask's path, or "
                "rename one image and its mask)",
            )
        if ref.mask_path:
            taken[ref.mask_path] = ref.image_path
    unmatched = sorted(masks - {Path(path) for path in taken})
    if not unmatched:
        return
    where = (
        f"at its image's path under {mask_tree.name}/ as the image is under "
        f"{image_root.name}/ (a split folder may be left out), or beside its image"
        if mask_tree
        else "beside its image"
    )
    raise DataError(
        unmatched[0],
        f"mask matches no image ({len(unmatched)} of {len(masks)} masks do not)",
        f"a mask takes its image's name{' plus ' + mask_suffix if mask_suffix else ''} and lies "
        f"{where}: move or rename it, or remove masks whose image is gone",
    )


def _class_folder(relative: Path, class_names: frozenset[str]) -> str | None:
    """The image's class folder: the innermost folder naming a known class, else the innermost
    that is neither a split folder nor a folder of images (magnetic-tile's ``MT_Crack/Imgs``)."""
    folders = [part for part in relative.parts[:-1] if split_named(part) is None]
    known = [part for part in folders if part in class_names]
    named = [part for part in folders if part.lower() not in IMAGE_TREES]
    return (known or named or [None])[-1]


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
