"""No leakage: what made a synthetic set must not have seen the evaluation images it is judged on.

A labelled synthetic set records, when it is made, the datasets its makers learnt from
(``trained_on``: the GAN's data, the labeller's, or the real set copy-paste cut from), each with
its dataset id and the ids of its train split. Mixing the set into a real dataset is refused
when any maker's train ids meet that dataset's val or test ids: a GAN trained on all of
NEU-Seg's train images leaks into a few-shot study whose test split is the images its 163 left
out. Only the manifests and the real dataset's id columns are read. ``check_no_copies``
compares the images themselves, once where a set meets a real one (`data mix`, `seg train
--synthetic`, a study's checks; not in every trial, which never opens the test split).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from defectforge.core.errors import DataError
from defectforge.core.files import write_json_atomic
from defectforge.core.storage import Location
from defectforge.datasets.contract import (
    MANIFEST,
    decode_png,
    read_parquet,
    read_split_table,
    split_files,
    split_location,
)
from defectforge.datasets.lineage import TrainingSource
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.twins import pixel_digest

HELD_OUT = ("val", "test")
# Beside a labelled set made from a folder: row id -> pixel digest of the image as read, before
# labelling resized it (a sidecar: it would make the manifest, read by every command, large).
SOURCE_PIXELS = "source_pixels.json"
FIXES = {
    "GAN": "train the GAN on {root}'s train split only",
    "labeller": "train the labeller on {root}'s train split only",
    "copy-paste source": "make the copy-paste set from {root} itself",
}


def split_ids(root: str | Path, splits: tuple[str, ...]) -> set[str]:
    """The sample ids in ``splits`` of a dataset (splits it lacks hold none)."""
    found: set[str] = set()
    for split in splits:
        table = read_split_table(root, split, columns=["id"])
        if table is not None:
            found.update(table["id"].to_pylist())
    return found


def maker_source(role: str, root: str | Path, learnt_id: str) -> TrainingSource:
    """A synthetic set's maker (``role``) as its ``trained_on`` record: the dataset it learnt
    from, that dataset's id then, and its train ids now (None: not there to list). A folder
    rebuilt since (another id) is refused: its train split may not be what the maker read."""
    table = read_split_table(root, "train", columns=["id"])
    if table is None:
        return TrainingSource(role, str(root), learnt_id, None)
    now = Manifest.load(root).dataset_id
    if learnt_id and now != learnt_id:
        raise DataError(
            Location.of(root) / MANIFEST,
            f"this dataset was rebuilt since the {role} learnt from it (id {now}, the {role}'s "
            f"{learnt_id}), so which of its images the {role} learnt from is no longer known",
            f"train the {role} again on this dataset",
        )
    return TrainingSource(role, str(root), learnt_id, sorted(table["id"].to_pylist()))


def check_no_leakage(
    real_root: str | Path, real: Manifest, synthetic_root: str | Path, synthetic: Manifest
) -> None:
    """Refuse a synthetic set whose GAN, labeller or copy-paste source learnt from a val or
    test image of ``real``."""
    where = Location.of(synthetic_root) / MANIFEST
    sources = synthetic.labelling.trained_on if synthetic.labelling else None
    if sources is None:
        raise DataError(
            where,
            "it does not record what its GAN and labeller learnt from (an older defectforge "
            "made it), so it cannot be checked for leakage",
            "label the images again with this version",
        )
    held_out = None
    for source in sources:
        if source.dataset_id == real.dataset_id:
            continue  # made from this very dataset, whose train split alone it read
        role, fix = source.role, FIXES[source.role].format(root=real_root)
        if source.train_ids is None:
            raise DataError(
                where,
                f"its {role} learnt from {source.data}, which was not there to list when the "
                "set was made, so it cannot be checked against this dataset's val and test images",
                fix,
            )
        held_out = held_out if held_out is not None else split_ids(real_root, HELD_OUT)
        leaked = sorted(set(source.train_ids) & held_out)
        if leaked:
            raise DataError(
                where,
                f"its {role} learnt from {len(leaked)} image(s) that are in {real_root}'s val or "
                f"test split (e.g. {leaked[0]}): they would be judged on images their synthetic "
                "data was made from",
                fix,
            )


def _rows(root: str | Path, split: str, columns: list[str]) -> Iterator[dict]:
    """The rows of a split (none if the dataset lacks it), one Parquet file in memory at once."""
    if not split_location(root, split).is_dir():
        return
    for file in split_files(root, split):
        yield from read_parquet([file], columns).to_pylist()


def write_source_pixels(path: Path, pixels: dict[str, str], kept: set[str]) -> None:
    """The sidecar of the rows in ``kept`` (none written when no row has a recorded digest)."""
    recorded = {row_id: digest for row_id, digest in pixels.items() if row_id in kept}
    if recorded:
        write_json_atomic(path, recorded)


def source_pixels(root: str | Path) -> dict[str, str]:
    """A labelled set's sidecar (empty for sets of a GAN, or labelled before it was written)."""
    location = Location.of(root) / SOURCE_PIXELS
    return json.loads(location.read_text()) if location.is_file() else {}


def _synthetic_images(root: str | Path, channels: int) -> Iterator[tuple[str, str]]:
    """(pixel digest, file or id) of each synthetic train image: as stored, and, for images of
    a folder, as read before labelling resized them (``SOURCE_PIXELS``)."""
    recorded = source_pixels(root)
    for row in _rows(root, "train", ["id", "image", "origin"]):
        named = (row["origin"] or row["id"]).split("|")[0]  # the file, not the labeller
        yield pixel_digest(decode_png(row["image"], channels)), named
        if row["id"] in recorded:
            yield recorded[row["id"]], named


def check_no_copies(real_root: str | Path, synthetic_root: str | Path) -> None:
    """Refuse a synthetic set that holds a copy of a val or test image of ``real_root`` (a
    folder of real images labelled with `synth label`), compared by decoded pixels."""
    channels = Manifest.load(real_root).channels
    held_out = {
        pixel_digest(decode_png(row["image"], channels)): (split, row["id"])
        for split in HELD_OUT
        for row in _rows(real_root, split, ["id", "image"])
    }
    for digest, named in _synthetic_images(synthetic_root, channels):
        if digest in held_out:
            split, real_id = held_out[digest]
            raise DataError(
                named,
                f"this synthetic image is a copy of {real_id} in {real_root}'s {split} split: "
                "a model would be judged on an image it learnt",
                "remove the copies of the real set's val and test images from the folder you "
                "labelled, and label it again",
            )
