"""Reading image files safely: every failure is a ``DataError`` naming the file.

The format is taken from the file's content, not its name (a PNG saved as ``.jpg`` is read as
the PNG it is). The size is read from the header before anything is decoded, so an image whose
header claims more than ``max_pixels`` pixels is refused without allocating it (a valid
12000 x 12000 RGB image takes 1.5 GB once decoded, in one worker).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from defectforge.core.errors import DataError

DEFAULT_MAX_PIXELS = 100_000_000
SKIP_FIX = "re-export the file or remove it (or pass --skip-bad)"
# The last bytes of a complete file, per format: a copy cut short lacks them.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
NAMES_BY_FORMAT = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
}
# Bits per value a camera may store (those above 8 in 16-bit files, the upper bits zero).
INPUT_BITS = (8, 10, 12, 14, 16)


def read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
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


def header(path: Path, data: bytes, what: str) -> tuple[str, int, int, str]:
    """(format, width, height, Pillow's mode) from the file's header, without decoding its
    pixels."""
    try:
        with warnings.catch_warnings():
            # Our own limit applies below; Pillow's bomb check would fire first on big headers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(data)) as image:
                    return image.format or "unknown", image.width, image.height, image.mode
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DataError(
            path, f"{what} cannot be read: not an image file in a known format", SKIP_FIX
        ) from None


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
    image_format, width, height, mode = header(path, data, what)
    if width * height > max_pixels:
        megapixels = round(width * height / 1e6, 3)
        raise DataError(
            path,
            f"{what} header claims {width} x {height} pixels ({megapixels:g} MP), "
            f"above the limit of {max_pixels / 1e6:g} MP",
            "raise --max-pixels if the image is genuine, or remove the file (or pass --skip-bad)",
        )
    marker = END_MARKERS.get(image_format)
    if marker and not data.rstrip(b"\0").endswith(marker):
        raise DataError(
            path,
            f"{what} cannot be read: {image_format} is truncated (no end marker)"
            + _format_note(path, image_format),
            SKIP_FIX,
        )
    if palette_indices and mode == "P":
        return _palette_indices(path, data, what)
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except (cv2.error, MemoryError) as err:
        problem = "out of memory" if isinstance(err, MemoryError) else "OpenCV failed to decode it"
        raise DataError(path, f"{what} cannot be read: {problem}", SKIP_FIX) from None
    if array is None:
        raise DataError(
            path,
            f"{what} cannot be read: corrupt {image_format} data"
            + _format_note(path, image_format),
            SKIP_FIX,
        )
    return array


def _palette_indices(path: Path, data: bytes, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        raise DataError(path, f"{what} cannot be read: corrupt palette image", SKIP_FIX) from None
