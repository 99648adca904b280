"""The one writer of datasets: rows in, a published dataset folder out.

Every command that makes a dataset (build, subset, augment, mix, label, generate, copy-paste,
combine) hands its rows to ``write_dataset``'s staging area, split by split, and its manifest at
the end. The writer checks that the rows hold exactly the contract's columns, fills the
manifest's counts from the rows written, and publishes the folder under the safety rules of
``core.outputs`` (never over an input, ``--overwrite`` only over defectforge's own output, all or
nothing).

Rows come as a pyarrow Table or as anything with ``write_parquet(path, min_rows_per_file=...)``
(a Ray Dataset: the Ray Data work stays in ``trainables``, this module imports no Ray).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from defectforge.core.errors import DataError
from defectforge.core.files import write_json_atomic
from defectforge.core.outputs import DATASET, check_output, publish_dir
from defectforge.core.storage import Location, is_uri
from defectforge.datasets.contract import (
    MANIFEST,
    SCHEMA,
    SPLITS,
    parquet_metadata,
    read_parquet,
    split_dir,
    split_files,
    split_location,
)
from defectforge.datasets.manifest import SYNTHETIC, Manifest, SplitCounts

ROWS_PER_FILE = 1024
COUNT_COLUMNS = ["source", "defect_class"]


class DatasetStaging:
    """A dataset being written: splits, extra files, and at the end its manifest.

    Files go to the local ``folder``, published whole at the end; rows a Ray Dataset writes go
    straight to ``remote`` when the dataset is on a store, since Ray Data's write tasks may run
    on nodes that cannot see this machine's folders.
    """

    def __init__(self, folder: Path, remote: Location | None = None):
        self.folder, self.remote = folder, remote
        self.manifest: Manifest | None = None
        self._tables_written = 0
        # With --overwrite the replaced dataset's files stay on the store until the new one is
        # whole: they are not this dataset's rows.
        self._replaced = (
            {file.uri for split in SPLITS for file in split_location(remote, split).files()}
            if remote is not None
            else set()
        )

    def write_split(self, split: str, rows) -> None:
        """Write rows (contract schema) of one split as Parquet files; a split may be written in
        several tables, one after another, so a large set never has to be held whole."""
        target = split_dir(self.folder, split)
        if isinstance(rows, pa.Table):
            target.mkdir(parents=True, exist_ok=True)
            name = f"rows-{self._tables_written:05d}.parquet"
            self._tables_written += 1
            pq.write_table(rows.select(list(SCHEMA.names)).cast(SCHEMA), target / name)
        elif self.remote is not None:
            rows.write_parquet((self.remote / split).uri, min_rows_per_file=ROWS_PER_FILE)
        else:
            rows.write_parquet(str(target), min_rows_per_file=ROWS_PER_FILE)

    def copy_split(self, source_root: str | Path, split: str) -> None:
        """A split of another dataset, unchanged (val and test of a mix)."""
        files = split_files(source_root, split)
        target = split_dir(self.folder, split)
        for index, file in enumerate(files):
            target.mkdir(parents=True, exist_ok=True)
            (target / f"copied-{index:05d}.parquet").write_bytes(file.read_bytes())

    def path(self, relative: str) -> Path:
        """Where an extra file (a report, a CSV, a plot) goes; its folder is made."""
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def publish(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def _finish(self) -> Manifest:
        if self.manifest is None:
            raise RuntimeError("a dataset was written without a manifest")
        counts = {split: self._counts(split) for split in SPLITS}
        manifest = replace(self.manifest, counts=counts)
        write_json_atomic(self.folder / MANIFEST, manifest.to_dict())
        return manifest

    def _counts(self, split: str) -> SplitCounts:
        folder = split_dir(self.folder, split)
        files = split_files(self.folder, split)
        if self.remote is not None:
            written = split_location(self.remote, split).files(".parquet")
            files += [file for file in written if file.uri not in self._replaced]
        if not files:
            if folder.is_dir():
                folder.rmdir()  # a split with no rows is no split: readers ask for it by folder
            return SplitCounts()
        for file in files:
            if parquet_metadata(file).schema.to_arrow_schema().remove_metadata() != SCHEMA:
                raise RuntimeError(f"{file}: rows written outside the Parquet contract's schema")
        table = read_parquet(files, columns=COUNT_COLUMNS)
        return SplitCounts.of(table["source"].to_pylist(), table["defect_class"].to_pylist())


def derived_from(data: str | Path, out: str | Path, overwrite: bool, use: str) -> Manifest:
    """The manifest of the dataset another is made from, after the output rules (never over it)
    and the check that it has masks (``use``: what is done with them)."""
    check_derived_output(out, overwrite, (data,))
    manifest = Manifest.load(data)
    manifest.require_masks(data, use)
    return manifest


def check_derived_output(out: str | Path, overwrite: bool, inputs: tuple) -> None:
    """The output rules of every dataset made from others (``core.outputs.check_output``), and
    one more: only `data build` replaces a dataset built from raw images, even with --overwrite.
    One mistyped --out would lose data that only the raw images give back (a derived set, a
    subset, mix or synthetic set, is made again by its command)."""
    check_output(out, overwrite, inputs, kind=DATASET)
    location = Location.of(out)
    if not (location / MANIFEST).is_file():
        return
    existing = Manifest.load(out)
    derived = existing.subset or existing.augmentation or existing.mix
    if existing.source != SYNTHETIC and not derived:
        raise DataError(
            location,
            f"--out holds a dataset built from raw images (source {existing.source}), which "
            "only `data build` replaces",
            "choose another --out",
        )


@contextlib.contextmanager
def write_dataset(
    out: str | Path, overwrite: bool = False, inputs: tuple = ()
) -> Iterator[DatasetStaging]:
    """Stage a dataset; on leaving the block its counts are filled in, its manifest written and
    the folder published. The caller must call ``staging.publish(manifest)``."""
    remote = Location.of(out) if is_uri(out) else None
    with publish_dir(out, overwrite, inputs, kind=DATASET) as folder:
        staging = DatasetStaging(folder, remote)
        yield staging
        staging.manifest = staging._finish()
