"""The Parquet contract between folders: schema, PNG cells, split folders, content identities.

A dataset directory looks like::

    DIR/manifest.json        counts, classes, channels, pixel statistics, lineage (datasets.manifest)
    DIR/<split>/*.parquet    one folder per split (train, val, test), rows as in ``SCHEMA``

One folder per split lets a study open train and val without ever touching test. Datasets are
written only through ``datasets.writer``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from defectforge.core.errors import DataError
from defectforge.core.files import atomic_write
from defectforge.core.storage import Location, store_errors

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("defect_class", pa.string()),
        ("label_confidence", pa.float32()),
        ("origin", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


# The fastest zlib level, and where OpenCV has the flag (recent releases) one fixed row filter
# instead of libpng's choice per row: an RGB overlay of 200 x 200 px in 1.26 ms instead of 2.10,
# 33 KiB instead of 32.
PNG_PARAMETERS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    PNG_PARAMETERS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def encode_png(array: np.ndarray) -> bytes:
    """Lossless 8-bit PNG of a HxW or HxWxC uint8 array (C in 1, 3; RGB order)."""
    if array.dtype != np.uint8:
        raise TypeError(f"PNG cells hold uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    ok, buf = cv2.imencode(".png", array, PNG_PARAMETERS)
    if not ok:
        raise ValueError("OpenCV could not encode the array as PNG")
    return buf.tobytes()


SOURCES = ("real", "synthetic")


def contract_row(
    *,
    id: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    dataset: str,
    origin: str,
    source: str = "synthetic",
    split: str = "train",
    defect_class: str | None = None,
    label_confidence: float | None = None,
) -> dict:
    """One row of ``SCHEMA``: ``image`` (HxWxC uint8, C 1 or 3, RGB order) and ``mask`` (HxW
    uint8 class ids of the image's size; None: not labelled yet) as PNG cells, the size and
    channels the image's. The defaults are a synthetic train row (val and test rows are real);
    ``label_confidence`` is None for a mask that is not a model's guess. A row the contract
    forbids (a mask of another size, an unknown split or source) is a ValueError."""
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"an image cell holds HxWx1 or HxWx3 pixels, got shape {image.shape}")
    if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(f"a mask of shape {mask.shape} for an image of {image.shape[:2]}")
    _check_split(split)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    return {
        "id": id,
        "image": encode_png(image),
        "mask": None if mask is None else encode_png(mask),
        "height": image.shape[0],
        "width": image.shape[1],
        "channels": image.shape[2],
        "dataset": dataset,
        "source": source,
        "split": split,
        "defect_class": defect_class,
        "label_confidence": label_confidence,
        "origin": origin,
    }


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Encode ``array`` as PNG at ``path``, atomically."""
    data = encode_png(array)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """HxWxC uint8 (RGB order for C=3) for an image cell, HxW for a mask cell (channels=0)."""
    flag = cv2.IMREAD_UNCHANGED
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if array is None:
        raise ValueError("cell is not a decodable PNG")
    if channels == 0:
        return array
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return array


def split_dir(root: str | Path, split: str) -> Path:
    """A split's folder in a local dataset folder (one being written: see ``datasets.writer``)."""
    _check_split(split)
    return Path(root) / split


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def split_location(root: str | Path | Location, split: str) -> Location:
    """A split's folder in a dataset on a disk or a store."""
    _check_split(split)
    return Location.of(root) / split


def split_files(root: str | Path | Location, split: str) -> list[Location]:
    """A split's Parquet files, each checked to be whole (a truncated file has no footer)."""
    files = split_location(root, split).files(".parquet")
    for file in files:
        parquet_metadata(file)
    return files


def parquet_metadata(file: Location) -> pq.FileMetaData:
    """A Parquet file's footer: a truncated or damaged file is one line naming it."""
    with store_errors(file.uri):  # a store that fails says so, not "corrupt"
        handle = file.filesystem.open_input_file(file.path)
    try:
        with handle:
            return pq.read_metadata(handle)
    except (pa.ArrowException, OSError):
        raise DataError(
            file,
            "Parquet file is truncated, corrupt or unreadable",
            "rebuild the dataset (the command that wrote it, with --overwrite)",
        ) from None


def read_parquet(files: list[Location], columns: list[str] | None = None) -> pa.Table:
    """The rows of Parquet files of one dataset (one filesystem) as one Table."""
    if not files:
        return pa.table({}) if columns is None else SCHEMA.empty_table().select(columns)
    return pq.read_table(
        [file.path for file in files], columns=columns, filesystem=files[0].filesystem
    )


def read_split_table(root: str | Path | Location, split: str, columns: list[str] | None = None):
    """One split of a dataset as a pyarrow Table; None if the dataset has no such split."""
    if not split_location(root, split).is_dir():
        return None
    return read_parquet(split_files(root, split), columns)


def only_ids(table: pa.Table, ids) -> pa.Table:
    """The rows of ``table`` whose id is in ``ids``."""
    return table.filter(pc.is_in(table["id"], value_set=pa.array(list(ids), pa.string())))


def without_ids(table: pa.Table, ids) -> pa.Table:
    """The rows of ``table`` whose id is not in ``ids``."""
    inside = pc.is_in(table["id"], value_set=pa.array(list(ids), pa.string()))
    return table.filter(pc.invert(inside))


def file_digest(path: str | Path | Location) -> str:
    location = Location.of(path)
    digest = hashlib.sha256()
    with location.filesystem.open_input_stream(location.path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(folder: str | Path | Location, weights_file: str) -> str:
    """A short, stable id of a trained model: its folder name and a hash of its weights."""
    folder = Location.of(folder)
    return f"{folder.name}-{file_digest(folder / weights_file)[:8]}"


def combined_digest(named_digests: dict[str, str]) -> str:
    """One sha256 over sorted (name, digest) pairs: the identity of a set of inputs."""
    digest = hashlib.sha256()
    for name in sorted(named_digests):
        digest.update(f"{name}\0{named_digests[name]}\n".encode())
    return digest.hexdigest()
