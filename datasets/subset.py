"""Few-shot subsets of a built dataset: N train images drawn seeded and stratified by defect class.

The paper's question is about scarcity (163 real training images). ``subset_dataset`` keeps N
train (and optionally M val, K test) rows, in the defect-class proportions of the parent, chosen by a
seeded stable order; with ``rest_as_test`` the rows left out join the test split, so a few-shot
model is judged on thousands of images it never saw. The manifest lists every kept id, and the
normalisation statistics are recomputed from the kept train images only.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import pyarrow as pa

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.core.errors import DataError
from defectforge.core.storage import Location
from defectforge.datasets.build import pixel_statistics
from defectforge.datasets.contract import (
    MANIFEST,
    SPLITS,
    decode_png,
    only_ids,
    read_split_table,
    without_ids,
)
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import stratified_ids
from defectforge.datasets.readers import pixel_sums
from defectforge.datasets.writer import derived_from, write_dataset

AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")


@dataclass(frozen=True)
class SubsetConfig(TypedConfig):
    kind = "subset config"

    train: int = option(
        MISSING,
        "train images kept, stratified by defect class",
        *AT_LEAST_ONE,
    )
    val: int = option(0, "val images kept, stratified (0: all of them)", lambda v: v >= 0, ">= 0")
    rest_as_test: bool = option(
        False, "train and val images left out join the test split (a large unseen test set)"
    )
    test: int = option(
        0,
        "test images kept, stratified, after --rest-as-test (0: all); bounds evaluation time",
        lambda v: v >= 0,
        ">= 0",
    )
    seed: int = option(0, "which images are drawn", *SEED)


def _kept(table: pa.Table | None, split: str, count: int, seed: int, where: Path) -> list[str]:
    if table is None:
        raise DataError(
            where, f"dataset has no {split} split to draw {count} from", f"drop --{split}"
        )
    ids = table["id"].to_pylist()
    if count > len(ids):
        raise DataError(
            where,
            f"--{split} {count} asks for more {split} images than the {len(ids)} there are",
            f"ask for at most {len(ids)}",
        )
    classes = dict(zip(ids, table["defect_class"].to_pylist(), strict=True))
    return stratified_ids(classes, count, seed)


def _as_test(table: pa.Table) -> pa.Table:
    column = table.schema.get_field_index("split")
    return table.set_column(column, "split", pa.array(["test"] * len(table), pa.string()))


def _pixel_statistics(table: pa.Table, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of the images in ``table`` (as a build computes them)."""
    rows = [pixel_sums(decode_png(cell, channels)) for cell in table["image"].to_pylist()]
    return pixel_statistics(rows, channels)


def subset_dataset(
    data: str | Path, out: str | Path, cfg: SubsetConfig, overwrite: bool = False
) -> Manifest:
    """Write the subset of ``data`` that ``cfg`` asks for; val and test untouched unless asked."""
    manifest = derived_from(data, out, overwrite, "subset")
    where = Location.of(data) / MANIFEST
    tables = {split: read_split_table(data, split) for split in SPLITS}
    kept = {"train": _kept(tables["train"], "train", cfg.train, cfg.seed, where)}
    if cfg.val:
        kept["val"] = _kept(tables["val"], "val", cfg.val, cfg.seed, where)
    left_out = [without_ids(tables[split], ids) for split, ids in kept.items()]
    for split, ids in kept.items():
        tables[split] = only_ids(tables[split], ids)
    if cfg.rest_as_test:
        parts = [t for t in (tables["test"], *map(_as_test, left_out)) if t is not None]
        tables["test"] = pa.concat_tables(parts)
    if cfg.test:
        kept["test"] = _kept(tables["test"], "test", cfg.test, cfg.seed, where)
        tables["test"] = only_ids(tables["test"], kept["test"])
    with write_dataset(out, overwrite, inputs=(data,)) as staging:
        for split, table in tables.items():
            if table is not None and len(table):
                staging.write_split(split, table)
        mean, std = _pixel_statistics(tables["train"], manifest.channels)
        staging.publish(manifest.subsetted(asdict(cfg), kept, mean, std))
    return staging.manifest
