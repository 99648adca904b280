"""Decode and check one sample: its image, its mask, and the contract row they make."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from defectforge.core.errors import DataError
from defectforge.datasets.contract import contract_row
from defectforge.datasets.images import DEFAULT_MAX_PIXELS, decode_file
from defectforge.datasets.samples import (
    IMAGE_SUFFIXES,
    SampleRef,
    SampleSpec,
    image_files,
    masks_among,
    refuse_same_names,
    require_folder,
    visible,
)
from defectforge.datasets.steel import folder_digest, read_steel_image
from defectforge.datasets.twins import pixel_digest

# JPEG round-off never makes a grey image's three channels differ by more than this.
GREY_CHANNEL_TOLERANCE = 2


def _image_pixels(path: Path, input_bits: int, max_pixels: int) -> np.ndarray:
    """The decoded image in 8 bits: images of more bits are shifted down by one scale for the
    whole set (a stretch per image would change what a defect looks like)."""
    array = decode_file(path, "image", max_pixels)
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(
            path,
            f"image has {array.dtype} pixels, and 8-bit or 16-bit integer images are read",
            "save it as an 8-bit image, or as a 16-bit PNG/TIFF of the camera's integer values "
            "(then build with --input-bits)",
        )
    if input_bits == 8:
        if array.dtype != np.uint8:
            raise DataError(
                path,
                f"image has {array.dtype} pixels, and 8-bit images are expected",
                "build the dataset with --input-bits (16, or the 10, 12 or 14 bits your camera "
                "stores) and use a model trained on it",
            )
        return array
    if array.dtype != np.uint16:
        raise DataError(
            path,
            f"image has {array.dtype} pixels, and {input_bits}-bit images in 16-bit files are "
            f"expected (--input-bits {input_bits})",
            f"give every image in the {input_bits}-bit form the dataset is built from",
        )
    top = int(array.max())
    if top >= 1 << input_bits:
        raise DataError(
            path,
            f"image holds the value {top}, above the {input_bits}-bit maximum "
            f"{(1 << input_bits) - 1}",
            "build with the bits the camera really stores (--input-bits 16 for full 16-bit images)",
        )
    return (array >> (input_bits - 8)).astype(np.uint8)


def _mask_pixels(path: Path, max_pixels: int) -> np.ndarray:
    """The decoded mask in 8 bits: a 16-bit mask (as some labelling tools save them) is read
    when its values are class ids or 0/255 levels."""
    array = decode_file(path, "mask", max_pixels, palette_indices=True)
    if array.dtype == np.uint16 and int(array.max()) <= 255:
        return array.astype(np.uint8)
    if array.dtype != np.uint8:
        raise DataError(
            path,
            f"mask has {array.dtype} values up to {array.max()}, and masks hold class ids or "
            "0-255 levels",
            "save masks as 8-bit PNG of class ids (0 background, 1, 2, ... the defect classes)",
        )
    return array


def _is_grey(array: np.ndarray) -> bool:
    if array.ndim == 2 or array.shape[2] == 1:
        return True
    spread = array.max(axis=2).astype(np.int16) - array.min(axis=2)
    return int(spread.max()) <= GREY_CHANNEL_TOLERANCE


def read_image(
    path: str | Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, input_bits: int = 8
) -> np.ndarray:
    """HxWxC uint8, RGB order. Grey stored as 3 equal channels is read as 1 channel, and grey
    as 3 equal channels where 3 are asked for."""
    path = Path(path)
    array = _without_opaque_alpha(path, _image_pixels(path, input_bits, max_pixels))
    if channels == 1:
        if not _is_grey(array):
            raise DataError(
                path,
                "image has 3 colour channels but 1 (grey) is expected",
                "convert it to grey, or use 3 channels (`data build --channels 3`, and a model "
                "trained on that dataset)",
            )
        return (array if array.ndim == 2 else array[:, :, 0])[:, :, None]
    if array.ndim == 2:  # grey as three equal channels: nothing is lost
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _without_opaque_alpha(path: Path, array: np.ndarray, what: str = "image") -> np.ndarray:
    """An alpha channel that hides nothing is dropped; one that does is refused. (OpenCV reads
    grey + alpha as four channels too.)"""
    if array.ndim != 3 or array.shape[2] != 4:
        return array
    opaque = np.iinfo(array.dtype).max
    if (array[:, :, 3] != opaque).any():
        fix = (
            "save it without alpha, as grey or RGB, with the background it should have"
            if what == "image"
            else "save masks as single-channel PNG of class ids (or 0/255 levels), without alpha"
        )
        raise DataError(path, f"{what} has a transparent alpha channel", fix)
    return array[:, :, :3]


def guess_channels(paths: list[str] | list[Path], input_bits: int = 8) -> int:
    """1 or 3, from the first image that can be read: an unreadable one is left for the load
    to report (or skip, with --skip-bad)."""
    unreadable: list[DataError] = []
    for path in paths:
        try:
            return 1 if _is_grey(_image_pixels(Path(path), input_bits, DEFAULT_MAX_PIXELS)) else 3
        except DataError as err:
            unreadable.append(err)
    raise unreadable[0]


def read_mask(
    path: str | Path, shape: tuple[int, int], spec: SampleSpec, folder_class: str | None
) -> np.ndarray:
    """HxW uint8 of class ids in ``spec.output_classes``."""
    path = Path(path)
    array = _without_opaque_alpha(path, _mask_pixels(path, spec.max_pixels), "mask")
    if array.ndim == 3:
        if not _is_grey(array):
            raise DataError(
                path, "mask has colour channels", "save masks as single-channel PNG of class ids"
            )
        array = array[:, :, 0]
    if array.shape != shape:
        turned = (
            " (sides swapped: an image with an EXIF orientation is read turned, as viewers show it)"
            if array.shape == shape[::-1]
            else ""
        )
        raise DataError(
            path,
            f"mask is {array.shape[1]}x{array.shape[0]} but its image is "
            f"{shape[1]}x{shape[0]}{turned}",
            "masks must match their image pixel for pixel, as the image is shown",
        )
    if spec.mask_threshold is not None:
        defect = array >= spec.mask_threshold
        # A defect-free image may sit in a folder that names no class (e.g. MT_Free); a binary
        # set counts every defect class as one.
        class_id = (
            _folder_class_id(path, spec, folder_class) if defect.any() and not spec.binary else 1
        )
        array = (defect * class_id).astype(np.uint8)
    else:
        outside = np.unique(array[array >= len(spec.classes)])
        if outside.size:
            raise DataError(
                path,
                f"mask values {outside[:5].tolist()} are outside the classes "
                f"0..{len(spec.classes) - 1} ({', '.join(spec.classes)})",
                "declare the classes (--classes or classes.yaml), or pass "
                "--mask-threshold 128 for 0/255 or soft masks",
            )
    return (array > 0).astype(np.uint8) if spec.binary else array


def _folder_class_id(path: Path, spec: SampleSpec, folder_class: str | None) -> int:
    """The class of a thresholded mask's defect pixels: its folder's class, else the one defect
    class there is."""
    if folder_class is None:
        if len(spec.classes) == 2:
            return 1
        raise DataError(
            path,
            f"a thresholded mask needs its defect class, and {list(spec.classes[1:])} are possible",
            "pass --class-from-folder (class = folder name), map folders in classes.yaml, or "
            "pass --binary (every defect class as one)",
        )
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
        image = read_image(ref.image_path, spec.channels, spec.max_pixels, spec.input_bits)
        return image, Path(ref.image_path).read_bytes()
    image = read_steel_image(ref.image_path, spec.root, spec.steel)
    return image, folder_digest(ref.image_path, spec.root).encode()


def pixel_sums(image: np.ndarray) -> dict:
    """An image's size and per-channel sums of its values and their squares: what
    ``build.pixel_statistics`` pools into a dataset's mean and std without keeping the images."""
    pixels = image.reshape(image.shape[0] * image.shape[1], -1).astype(np.float64)
    return {
        "height": image.shape[0],
        "width": image.shape[1],
        "pixel_sum": pixels.sum(axis=0).tolist(),
        "pixel_sumsq": np.square(pixels).sum(axis=0).tolist(),
    }


def load_sample(ref: SampleRef, spec: SampleSpec) -> dict:
    """Decode, check and encode one sample as a contract row (plus its input digest)."""
    image, image_digest = _read_input(ref, spec)  # an unreadable image is told first
    if ref.mask_path is None and not spec.missing_mask_is_background:
        raise DataError(
            ref.image_path,
            "no mask found for this image",
            "add its mask (the same name under masks/ or labels/, or beside it with the "
            "--mask-suffix; png/bmp/tif/pgm/jpg), pass --missing-mask background if images without "
            "a mask are defect-free, or remove the image",
        )
    if ref.mask_path is None:
        mask, mask_bytes = np.zeros(image.shape[:2], np.uint8), b"no mask"
    else:
        mask = read_mask(ref.mask_path, image.shape[:2], spec, ref.folder_class)
        mask_bytes = Path(ref.mask_path).read_bytes()
    digest = hashlib.sha256(image_digest + mask_bytes)
    return {
        **contract_row(
            id=ref.id,
            image=image,
            mask=mask,
            dataset=spec.dataset,
            origin=ref.image_path,
            source="real",
            split=ref.split,
            defect_class=dominant_class(mask, spec.output_classes),
        ),
        "input_digest": digest.hexdigest(),
        "pixel_digest": pixel_digest(image),
        "split_group": ref.split_group,
        "mask_digest": pixel_digest(mask),
        "mask_missing": ref.mask_path is None,
        **pixel_sums(image),
    }


def _own_image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and visible(p.name)
    )


def list_images(folder: str | Path, mask_suffix: str = "") -> list[Path]:
    """The images directly in ``folder`` (or the one image ``folder`` names); masks beside them
    (``images_and_masks``) left out."""
    return images_and_masks(folder, mask_suffix)[0]


def images_and_masks(folder: str | Path, mask_suffix: str = "") -> tuple[list[Path], list[Path]]:
    """The images directly in ``folder`` (or the one image ``folder`` names), and the files
    beside them taken for their masks (and so not images)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
        return [folder], []
    require_folder(folder, "--images")
    files = _own_image_files(folder)
    masks = masks_among(files, mask_suffix)
    images = [p for p in files if p not in masks]
    if not images:
        below = images_in_subfolders(folder)
        raise DataError(
            folder,
            f"no images found in it (looked for {', '.join(IMAGE_SUFFIXES)})"
            + (f"; {below} lie in its subfolders, which are not read" if below else ""),
            "point --images at a folder of images" + (", e.g. each subfolder" if below else ""),
        )
    refuse_same_names([(p.stem, p) for p in images])
    return images, sorted(masks)


def images_in_subfolders(folder: str | Path) -> int:
    """How many images lie in ``folder``'s subfolders, which commands reading a folder's own
    images leave out."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(1 for p in image_files(folder) if p.parent != folder)
