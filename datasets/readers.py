"""Find samples on disk and turn one sample into a validated contract row.

Discovery (``discover_neu_seg``, ``discover_folder``) only lists paths, so it is fast; decoding and
checking happen per sample in ``load_sample``, which the Parquet build runs in parallel.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from defectforge.datasets.contract import SPLITS, encode_png
from defectforge.datasets.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NEU_SEG_CLASSES = ("background", "inclusion", "patches", "scratches")
CLASS_FILES = ("classes.yaml", "classes.yml", "classes.json")
# JPEG round-off never makes a grey image's three channels differ by more than this.
GREY_CHANNEL_TOLERANCE = 2


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
    steel: Any = None  # SteelOptions: samples are photometric-stereo folders under ``root``
    root: str = ""

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
            mask = root / "masks" / split_folder.name / f"{image.stem}.png"
            refs.append(
                SampleRef(
                    sample_id,
                    str(image),
                    str(mask) if mask.is_file() else None,
                    carve_test_split(sample_id, split_folder.name, test_fraction),
                )
            )
    _require_images(root, refs)
    return refs


def _find_mask(
    folder: Path, stem: str, mask_suffix: str, exclude: Path | None = None
) -> Path | None:
    for suffix in (".png", ".bmp", ".tif", ".tiff"):
        candidate = folder / f"{stem}{mask_suffix}{suffix}"
        if candidate != exclude and candidate.is_file():
            return candidate
    return None


def _is_mask_file(path: Path, mask_suffix: str) -> bool:
    if mask_suffix:
        return path.stem.endswith(mask_suffix)
    # Without a suffix, a PNG beside a same-stem image of another format is that image's mask.
    return path.suffix.lower() == ".png" and any(
        path.with_suffix(s).is_file() for s in IMAGE_SUFFIXES if s != ".png"
    )


def discover_folder(
    root: str | Path,
    dataset: str,
    split_ratios: tuple[float, float, float],
    mask_suffix: str = "",
    class_from_folder: bool = False,
) -> list[SampleRef]:
    """Generic layout: ``images/`` + ``masks/`` trees, or masks beside their images.

    A first path component named train/val/test sets the split; otherwise a hash of the id does.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "folder does not exist", "check the --root path")
    paired = (root / "images").is_dir() and (root / "masks").is_dir()
    image_root = root / "images" if paired else root
    images = [p for p in _images_in(image_root) if paired or not _is_mask_file(p, mask_suffix)]
    _require_images(root, images)
    refs = []
    for image in images:
        relative = image.relative_to(image_root)
        sample_id = f"{dataset}/{relative.with_suffix('').as_posix()}"
        if paired:
            mask = _find_mask((root / "masks" / relative).parent, image.stem, mask_suffix)
        else:
            mask = _find_mask(image.parent, image.stem, mask_suffix, exclude=image)
        first = relative.parts[0] if len(relative.parts) > 1 else ""
        split = first if first in SPLITS else hash_split(sample_id, split_ratios)
        folder_class = _top_folder(relative) if class_from_folder else None
        refs.append(
            SampleRef(sample_id, str(image), str(mask) if mask else None, split, folder_class)
        )
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


def _truncation_problem(path: Path, data: bytes) -> str | None:
    if not data:
        return "file is empty"
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "JPEG is truncated (no end-of-image marker)"
    if suffix == ".png" and not data.endswith(b"IEND\xaeB`\x82"):
        return "PNG is truncated (no IEND chunk)"
    return None


def _decode(path: Path, what: str) -> np.ndarray:
    data = path.read_bytes()
    problem = _truncation_problem(path, data)
    array = None if problem else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DataError(
            path,
            f"{what} cannot be read: {problem or 'corrupt or unsupported format'}",
            "re-export the file or remove it (or pass --skip-bad)",
        )
    if array.dtype != np.uint8:
        raise DataError(
            path,
            f"{what} has {array.dtype} pixels, 8-bit expected",
            "convert it to 8-bit (steel maps of 16 bit go through --source steel)",
        )
    return array


def _is_grey(array: np.ndarray) -> bool:
    if array.ndim == 2 or array.shape[2] == 1:
        return True
    spread = array.max(axis=2).astype(np.int16) - array.min(axis=2)
    return int(spread.max()) <= GREY_CHANNEL_TOLERANCE


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """HxWxC uint8, RGB order. Grey stored as 3 equal channels is read as 1 channel."""
    path = Path(path)
    array = _decode(path, "image")
    if array.ndim == 3 and array.shape[2] == 4:
        raise DataError(
            path, "image has 4 channels (alpha)", "save it without alpha as grey or RGB"
        )
    if channels == 1:
        if not _is_grey(array):
            raise DataError(
                path,
                "image has 3 colour channels but the dataset is 1-channel",
                "pass --channels 3",
            )
        return (array if array.ndim == 2 else array[:, :, 0])[:, :, None]
    if array.ndim == 2:
        raise DataError(
            path, "image has 1 channel but the dataset is 3-channel", "pass --channels 1"
        )
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def guess_channels(path: str | Path) -> int:
    return 1 if _is_grey(_decode(Path(path), "image")) else 3


def read_mask(
    path: str | Path, shape: tuple[int, int], spec: SampleSpec, folder_class: str | None
) -> np.ndarray:
    """HxW uint8 of class ids in ``spec.output_classes``."""
    path = Path(path)
    array = _decode(path, "mask")
    if array.ndim == 3:
        if not _is_grey(array):
            raise DataError(
                path, "mask has colour channels", "save masks as single-channel PNG of class ids"
            )
        array = array[:, :, 0]
    if array.shape != shape:
        raise DataError(
            path,
            f"mask is {array.shape[1]}x{array.shape[0]} but its image is {shape[1]}x{shape[0]}",
            "masks must match their image pixel for pixel",
        )
    if spec.mask_threshold is not None:
        defect = array >= spec.mask_threshold
        # A defect-free image may sit in a folder that names no class (e.g. MT_Free).
        class_id = _folder_class_id(path, spec, folder_class) if defect.any() else 0
        array = (defect * class_id).astype(np.uint8)
    else:
        outside = np.unique(array[array >= len(spec.classes)])
        if outside.size:
            raise DataError(
                path,
                f"mask values {outside[:5].tolist()} are outside the declared "
                f"classes 0..{len(spec.classes) - 1}",
                "declare the classes (--classes or classes.yaml), or pass "
                "--mask-threshold 128 for 0/255 or soft masks",
            )
    return (array > 0).astype(np.uint8) if spec.binary else array


def _folder_class_id(path: Path, spec: SampleSpec, folder_class: str | None) -> int:
    if folder_class is None:
        return 1
    name = spec.folder_classes.get(folder_class, folder_class)
    if name not in spec.classes:
        raise DataError(
            path,
            f"folder class {name!r} is not among {list(spec.classes)}",
            "add it to --classes or map the folder in classes.yaml",
        )
    return spec.classes.index(name)


def dominant_class(mask: np.ndarray, names: tuple[str, ...]) -> str | None:
    counts = np.bincount(mask.ravel(), minlength=len(names))
    counts[0] = 0
    return names[int(counts.argmax())] if counts.any() else None


def _read_input(ref: SampleRef, spec: SampleSpec) -> tuple[np.ndarray, bytes]:
    """The sample's image and the bytes that identify its inputs."""
    if spec.steel is None:
        return read_image(ref.image_path, spec.channels), Path(ref.image_path).read_bytes()
    # steel.py builds on this module's discovery helpers, so it is imported here, not above.
    from defectforge.datasets.steel import folder_digest, read_steel_image

    image = read_steel_image(ref.image_path, spec.root, spec.steel)
    return image, folder_digest(ref.image_path, spec.root).encode()


def load_sample(ref: SampleRef, spec: SampleSpec) -> dict:
    """Decode, check and encode one sample as a contract row (plus its input digest)."""
    if ref.mask_path is None:
        raise DataError(
            ref.image_path,
            "no mask found for this image",
            "add <stem>.png to the masks folder, or remove the image (or pass --skip-bad)",
        )
    image, image_digest = _read_input(ref, spec)
    mask = read_mask(ref.mask_path, image.shape[:2], spec, ref.folder_class)
    digest = hashlib.sha256(image_digest + Path(ref.mask_path).read_bytes())
    return {
        "id": ref.id,
        "image": encode_png(image),
        "mask": encode_png(mask),
        "height": image.shape[0],
        "width": image.shape[1],
        "channels": spec.channels,
        "dataset": spec.dataset,
        "source": "real",
        "split": ref.split,
        "defect_class": dominant_class(mask, spec.output_classes),
        "label_confidence": None,
        "origin": ref.image_path,
        "input_digest": digest.hexdigest(),
        "pixel_sum": image.reshape(-1, spec.channels).sum(axis=0, dtype=np.float64).tolist(),
        "pixel_sumsq": (image.reshape(-1, spec.channels).astype(np.float64) ** 2)
        .sum(axis=0)
        .tolist(),
    }


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "folder does not exist", "check the --images path")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(
            folder,
            f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})",
            "point --images at a folder of images",
        )
    return images
