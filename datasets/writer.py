"""The one writer of datasets: rows in, a published dataset folder out.

Every command that makes a dataset (build, augment, mix, label, generate) hands its rows to
``write_dataset``'s staging area, split by split, and its manifest at the end. The writer checks
that the rows hold exactly the contract's columns, fills the manifest's counts from the rows
written, and publishes the folder under the safety rules of ``datasets.outputs`` (never over an
input, ``--overwrite`` only over defectforge's own output, all or nothing).

Rows come as a pyarrow Table or as anything with ``write_parquet(path, min_rows_per_file=...)``
(a Ray Dataset: the Ray Data work stays in ``trainables``, this module imports no Ray).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from defectforge.datasets.contract import MANIFEST, SCHEMA, SPLITS, split_dir
from defectforge.datasets.files import write_json_atomic
from defectforge.datasets.manifest import Manifest, SplitCounts
from defectforge.datasets.outputs import check_output, publish_dir

ROWS_PER_FILE = 1024
COUNT_COLUMNS = ["source", "defect_class"]


class DatasetStaging:
    """A dataset being written: splits, extra files, and at the end its manifest."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest: Manifest | None = None

    def write_split(self, split: str, rows) -> None:
        """Write one split's rows (contract schema) as Parquet files."""
        target = split_dir(self.folder, split)
        if isinstance(rows, pa.Table):
            target.mkdir(parents=True, exist_ok=True)
            pq.write_table(rows.select(list(SCHEMA.names)).cast(SCHEMA), target / "rows.parquet")
        else:
            rows.write_parquet(str(target), min_rows_per_file=ROWS_PER_FILE)

    def copy_split(self, source_root: str | Path, split: str) -> None:
        """A split of another dataset, unchanged (val and test of a mix)."""
        source = split_dir(source_root, split)
        if source.is_dir():
            shutil.copytree(source, split_dir(self.folder, split))

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
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not files:
            if folder.is_dir():
                folder.rmdir()  # a split with no rows is no split: readers ask for it by folder
            return SplitCounts()
        for path in files:
            if pq.read_schema(path).remove_metadata() != SCHEMA:
                raise RuntimeError(f"{path}: rows written outside the Parquet contract's schema")
        table = pq.read_table(folder, columns=COUNT_COLUMNS)
        return SplitCounts.of(table["source"].to_pylist(), table["defect_class"].to_pylist())


def derived_from(data: str | Path, out: str | Path, overwrite: bool, use: str) -> Manifest:
    """The manifest of the dataset another is made from, after the output rules (never over it)
    and the check that it has masks (``use``: what is done with them)."""
    check_output(out, overwrite, (data,))
    manifest = Manifest.load(data)
    manifest.require_masks(data, use)
    return manifest


@contextlib.contextmanager
def write_dataset(
    out: str | Path, overwrite: bool = False, inputs: tuple = ()
) -> Iterator[DatasetStaging]:
    """Stage a dataset; on leaving the block its counts are filled in, its manifest written and
    the folder published. The caller must call ``staging.publish(manifest)``."""
    with publish_dir(out, overwrite, inputs, kind="dataset") as folder:
        staging = DatasetStaging(folder)
        yield staging
        staging.manifest = staging._finish()
