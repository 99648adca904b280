"""Reading image files safely: every failure is a ``DataError`` naming the file.

The format is taken from the file's content, not its name (a PNG saved as ``.jpg`` is read as
the PNG it is). The size is read from the header before anything is decoded, so an image whose
header claims more than ``max_pixels`` pixels is refused without allocating it (a valid
12000 x 12000 RGB image takes 1.5 GB once decoded, in one worker).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from defectforge.core.errors import DataError

DEFAULT_MAX_PIXELS = 100_000_000
# Ends a bad file's fix where the command has --skip-bad (`data build`, `predict`): readers
# serve commands without it too, so they leave it to those two.
SKIP_BAD_HINT = " (or pass --skip-bad)"
SKIP_FIX = "re-export the file or remove it"
# The last bytes of a complete file, per format: a copy cut short lacks them.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
NAMES_BY_FORMAT = {
    "JPEG": (".jpg", ".jpeg", ".jpe"),
    "PNG": (".png",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "PPM": (".pgm", ".ppm", ".pnm", ".pbm"),
}
EXIF_ORIENTATION = 0x0112
# How each EXIF orientation's stored pixels turn into the view shown (1: as stored).
DISPLAY_TURNS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
# Bits per value a camera may store (those above 8 in 16-bit files, the upper bits zero).
INPUT_BITS = (8, 10, 12, 14, 16)


def read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(
                path,
                f"{what} is a link to {os.readlink(path)}, which does not exist",
                "point the link at the file, or remove it",
            ) from None
        raise DataError(path, f"{what} cannot be read: file does not exist", SKIP_FIX) from None
    except PermissionError:
        raise DataError(
            path, f"{what} cannot be read: permission denied", "make it readable (chmod)"
        ) from None
    except IsADirectoryError:
        raise DataError(path, f"{what} is a folder, not a file", "remove or rename it") from None
    except OSError as err:
        raise DataError(path, f"{what} cannot be read: {err.strerror}", SKIP_FIX) from None
    if not data:
        raise DataError(path, f"{what} cannot be read: file is empty", SKIP_FIX)
    return data


@dataclass(frozen=True)
class Header:
    """What a file's header says, read without decoding its pixels."""

    format: str
    width: int
    height: int
    mode: str  # Pillow's
    orientation: int  # EXIF: 1 as stored, 2-8 turned or mirrored for display
    pages: int


def header(path: Path, data: bytes, what: str) -> Header:
    try:
        with warnings.catch_warnings():
            # Our own limit applies below; Pillow's bomb check would fire first on big headers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(data)) as image:
                    return Header(
                        image.format or "unknown",
                        image.width,
                        image.height,
                        image.mode,
                        _orientation(image),
                        getattr(image, "n_frames", 1),
                    )
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DataError(
            path, f"{what} cannot be read: not an image file in a known format", SKIP_FIX
        ) from None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation where the header holds it (JPEG, TIFF, a PNG's eXIf chunk before
    its pixels), never decoding the pixels to look further (``getexif`` would for a PNG); an
    unreadable EXIF block counts as none, as viewers take it."""
    try:
        raw = image.info.get("exif")
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(EXIF_ORIENTATION, 1))
        tags = getattr(image, "tag_v2", None)
        return int(tags.get(EXIF_ORIENTATION, 1)) if tags is not None else 1
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError):
        return 1


def _format_note(path: Path, image_format: str) -> str:
    """' (its content is PNG, not what .jpg says)' where name and content disagree."""
    names = NAMES_BY_FORMAT.get(image_format)
    if names and path.suffix.lower() not in names:
        return f" (its content is {image_format}, not what {path.suffix} says)"
    return ""


def decode_file(
    path: str | Path,
    what: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    flags: int = cv2.IMREAD_UNCHANGED,
    palette_indices: bool = False,
) -> np.ndarray:
    """The decoded array of an image file (OpenCV's channel order), or a DataError.
    ``palette_indices``: a palette image (as Pascal VOC-style masks are saved) gives its indices,
    not the colours they stand for."""
    path = Path(path)
    data = read_bytes(path, what)
    head = header(path, data, what)
    if head.width * head.height > max_pixels:
        megapixels = round(head.width * head.height / 1e6, 3)
        raise DataError(
            path,
            f"{what} header claims {head.width} x {head.height} pixels ({megapixels:g} MP), "
            f"above the limit of {max_pixels / 1e6:g} MP",
            "raise --max-pixels if the image is genuine, or remove the file",
        )
    if head.pages > 1:
        raise DataError(
            path,
            f"{what} holds {head.pages} pages, and one image per file is read",
            "save each page as a file of its own (with its own mask), or remove the file",
        )
    marker = END_MARKERS.get(head.format)
    if marker and not data.rstrip(b"\0").endswith(marker):
        raise DataError(
            path,
            f"{what} cannot be read: {head.format} is truncated (no end marker)"
            + _format_note(path, head.format),
            SKIP_FIX,
        )
    if palette_indices and head.mode == "P":
        return as_displayed(_palette_indices(path, data, what), head.orientation)
    try:
        # Turned below, for every format and flag alike (UNCHANGED already ignores it).
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    except (cv2.error, MemoryError) as err:
        problem = "out of memory" if isinstance(err, MemoryError) else "OpenCV failed to decode it"
        raise DataError(path, f"{what} cannot be read: {problem}", SKIP_FIX) from None
    if array is None:
        raise DataError(
            path,
            f"{what} cannot be read: corrupt {head.format} data" + _format_note(path, head.format),
            SKIP_FIX,
        )
    return as_displayed(array, head.orientation)


def as_displayed(array: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels as a viewer (and a labelling tool) shows them: a camera that stores its JPEGs
    unturned with an EXIF orientation has its masks drawn on the turned view."""
    turned = DISPLAY_TURNS.get(orientation)
    return np.ascontiguousarray(turned(array)) if turned else array


def _palette_indices(path: Path, data: bytes, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        raise DataError(path, f"{what} cannot be read: corrupt palette image", SKIP_FIX) from None
